"""The README's "Your own dataset" walkthrough, run as written (tiny LLM), and what the defaults infer or refuse."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from recbole_ilora.cli import main as cli_main
from recbole_ilora.config import Config
from recbole_ilora.data import DatasetError, check_atomic_files

README = Path(__file__).resolve().parent.parent / "README.md"
# Test-only settings on top of the README's command: the tiny random LLM and a tiny gate encoder, quiet, in tmp.
TINY = ["--llm_path=tiny-random-llama", "--gate_sasrec={'epochs': 1, 'hidden_size': 16, 'inner_size': 32}",
        "--epochs=1", "--gpu_id=''", "--show_progress=False", "--state=WARNING"]


def walkthrough() -> tuple[str, list[str]]:
    """The README block: its shell commands that write the files, and the run_recbole_ilora.py command."""
    block = re.search(r"<!-- own-dataset walkthrough.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = block.rstrip("\n").split("\n")
    assert lines[-1].startswith("python run_recbole_ilora.py ")
    return "\n".join(lines[:-1]) + "\n", shlex.split(lines[-1])[2:]


def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch):
    files, command = walkthrough()
    subprocess.run(["bash", "-e", "-c", files], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    result = cli_main(command + TINY)
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (1, 3, 5)}
    assert len(result["test_per_user"]["hit@1"]) == 4  # all four readers, none dropped
    config = Config(model="iLoRA", dataset="mybooks", config_file_list=["mybooks.yaml"])
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    assert config["item_text_field"] == "title" and "title" in config.inferred_columns
    assert config["user_inter_num_interval"] == "[3,inf)" and config["MAX_ITEM_LIST_LENGTH"] == 10


def write(root: Path, inter_header: str, rows: list[str], item_header="item_id:token\ttitle:token_seq", name="own"):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text(inter_header + "\n" + "\n".join(rows) + "\n")
    items = sorted({row.split("\t")[1] for row in rows})
    (folder / f"{name}.item").write_text(item_header + "\n" + "".join(f"{i}\tBook {i}\n" for i in items))
    return {"data_path": str(root)}


ROWS = [f"u{u}\tb{(u + t) % 7}\t{t}" for u in range(3) for t in range(4)]


def test_no_timestamp_is_one_line_naming_file_and_fix(tmp_path):
    settings = write(tmp_path, "user_id:token\titem_id:token", [r.rsplit("\t", 1)[0] for r in ROWS])
    with pytest.raises(DatasetError, match=r"own\.inter: the header has no 'timestamp' field .* Add a column "
                                           r"'timestamp:float'"):
        check_atomic_files(Config(model="SASRec", dataset="own", config_dict=settings))


def test_a_load_col_without_the_timestamp_is_refused(tmp_path):
    settings = write(tmp_path, "user_id:token\titem_id:token\ttimestamp:float", ROWS)
    config = Config(model="SASRec", dataset="own", config_dict={**settings, "load_col": {"inter": ["user_id", "item_id"]}})
    with pytest.raises(DatasetError, match=r"load_col\['inter'\] is \['user_id', 'item_id'\], without 'timestamp'"):
        check_atomic_files(config)


@pytest.mark.parametrize("header, field", [("item_id:token\tbook_name:token_seq", "book_name"),
                                           ("item_id:token\ttitle:token\tseries_title:token_seq", "title"),
                                           ("item_id:token\tgenre:token\tname:token", "name")])
def test_the_title_field_is_found_in_the_header(tmp_path, header, field):
    settings = write(tmp_path, "user_id:token\titem_id:token\ttimestamp:float", ROWS, item_header=header)
    config = Config(model="iLoRA", dataset="own", config_dict={**settings, "llm_path": "tiny-random-llama"})
    assert config["item_text_field"] == field and config["load_col"]["item"] == ["item_id", field]
    assert Config(model="SASRec", dataset="own", config_dict=settings)["load_col"] == {
        "inter": ["user_id", "item_id", "timestamp"]}  # baselines read no titles


def test_an_ambiguous_title_field_is_one_line(tmp_path):
    header = "item_id:token\tbook_title:token_seq\tauthor_name:token"
    settings = write(tmp_path, "user_id:token\titem_id:token\ttimestamp:float", ROWS, item_header=header)
    with pytest.raises(DatasetError, match=r"own\.item: several fields could hold the item titles .*--item_text_field"):
        Config(model="iLoRA", dataset="own", config_dict={**settings, "llm_path": "tiny-random-llama"})
    config = Config(model="iLoRA", dataset="own", config_dict={**settings, "llm_path": "tiny-random-llama",
                                                                 "item_text_field": "book_title"})
    assert config["load_col"]["item"] == ["item_id", "book_title"]


def test_users_with_two_interactions_each_stop_before_training(tmp_path):
    rows = [f"u{u}\tb{u}{t}\t{t}" for u in range(5) for t in range(2)]
    settings = write(tmp_path, "user_id:token\titem_id:token\ttimestamp:float", rows)
    config = Config(model="SASRec", dataset="own", config_dict=settings)
    with pytest.raises(DatasetError, match=r"would leave no interactions"):  # the protocol's [3,inf) filter
        check_atomic_files(config)
    config = Config(model="SASRec", dataset="own", config_dict={**settings, "user_inter_num_interval": "[0,inf)"})
    with pytest.raises(DatasetError, match=r"no user has 3 or more interactions \(the most is 2\).*nothing to train on"):
        check_atomic_files(config)


def test_a_timestamp_declared_as_token_is_refused(tmp_path):
    """RecBole would order a token field by its remapped ids: the split would silently use another order."""
    settings = write(tmp_path, "user_id:token\titem_id:token\ttimestamp:token", ROWS)
    with pytest.raises(DatasetError, match=r"declares 'timestamp:token'.*Declare it 'timestamp:float'"):
        check_atomic_files(Config(model="SASRec", dataset="own", config_dict=settings))


def test_no_item_file_for_an_llm_model_is_one_line(tmp_path):
    settings = write(tmp_path, "user_id:token\titem_id:token\ttimestamp:float", ROWS)
    (tmp_path / "own" / "own.item").unlink()
    with pytest.raises(DatasetError, match=r"own\.item does not exist, and the LLM models write every item as its title"):
        Config(model="iLoRA", dataset="own", config_dict={**settings, "llm_path": "tiny-random-llama"})
    Config(model="SASRec", dataset="own", config_dict=settings)  # a baseline needs no titles
