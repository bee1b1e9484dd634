"""Settings: precedence of the defaults files, merging of partial dicts, refusal of unreadable values."""

from __future__ import annotations

import pytest

from recbole_ilora.cli import main as cli_main
from recbole_ilora.config import Config, ConfigError


def test_dataset_settings_reach_every_model():
    """properties/model/iLoRA.yaml's generic wording must not win over the dataset's domain."""
    for model in ("SASRec", "iLoRA", "LLaRA", "TALLRec"):
        assert Config(model=model, dataset="ml-100k")["prompt_domain"] == "movie", model
    assert Config(model="iLoRA", dataset="lastfm")["prompt_domain"] == "artist"
    assert Config(model="iLoRA", dataset="ml-100k", config_dict={"prompt_domain": "item"})["prompt_domain"] == "item"


def test_partial_dict_overrides_merge_into_the_defaults():
    config = Config(model="Pop", dataset="ml-100k", config_dict={"eval_args": {"mode": "full"}})
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    assert config["eval_args"]["mode"] == {"valid": "full", "test": "full"}
    ilora = Config(model="iLoRA", dataset="ml-100k", config_dict={"gate_sasrec": {"epochs": 3}})
    assert ilora["gate_sasrec"]["epochs"] == 3 and ilora["gate_sasrec"]["hidden_size"] == 64
    assert "by TO" in config.protocol() and "full" in config.protocol()


def test_partial_dict_in_a_config_file_merges_too(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("eval_args:\n  mode: {valid: uni99, test: uni99}\n")
    config = Config(model="Pop", dataset="ml-100k", config_file_list=[str(path)])
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["eval_args"]["mode"] == {"valid": "uni99", "test": "uni99"}


def test_variants_are_config_driven():
    assert Config(model="iLoRA", dataset="ml-100k")["num_experts"] == 4
    llara = Config(model="LLaRA", dataset="ml-100k")
    assert llara["num_experts"] == 1 and llara["use_behaviour_tokens"] and llara["lora_rank"] == 8
    tallrec = Config(model="TALLRec", dataset="ml-100k")
    assert tallrec["num_experts"] == 1 and not tallrec["use_behaviour_tokens"]
    assert Config(model="LLaRA", dataset="ml-100k", config_dict={"num_experts": 2})["num_experts"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": "abc"}, r"'epochs' \(--epochs\) is 'abc', which cannot be read as a int"),
        ({"topk": "[1,5"}, r"'topk' \(--topk\) is '\[1,5'"),
        ({"learning_rate": "fast"}, "cannot be read as a float"),
        ({"eval_args": "{'mode': 'full'"}, "cannot be read as a dict"),
        ({"learnig_rate": 0.1}, "Unknown setting 'learnig_rate'.*Did you mean learning_rate"),
        ({"stoping_step": 3}, "Did you mean stopping_step"),
    ],
)
def test_unreadable_or_unknown_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config(model="SASRec", dataset="ml-100k", config_dict=overrides)


def test_list_settings_still_accept_a_single_name():
    assert Config(model="SASRec", dataset="ml-100k", config_dict={"metrics": "Hit", "valid_metric": "Hit@5"})["metrics"] == ["Hit"]


def test_config_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config(model="Pop", dataset="ml-100k", config_file_list=[str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        Config(model="Pop", dataset="ml-100k", config_file_list=[str(broken)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n")
    with pytest.raises(ConfigError, match="must hold `key: value` settings"):
        Config(model="Pop", dataset="ml-100k", config_file_list=[str(listed)])


@pytest.mark.parametrize("argument", ["--epochs=abc", "--topk=[1,5", "--learnig_rate=0.1"])
def test_cli_prints_one_clear_error_and_exits_2(argument, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--model=Pop", "--dataset=ml-100k", argument])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error:" in error and "Traceback" not in error and argument[2:].split("=")[0] in error


def test_console_script_exits_zero_without_printing_the_result(monkeypatch):
    from recbole_ilora import cli

    monkeypatch.setattr(cli, "main", lambda: {"test_result": {"hit@1": 0.5}})
    assert cli.console_entry_point() == 0
