"""Datasets that cannot feed prompts fail loudly, naming dataset, file, field and fix; no network used."""

from pathlib import Path

import pandas as pd
import pytest
from recbole.data import create_dataset

import recbole_ilora  # noqa: F401 - RecBole compatibility fixes
from recbole_ilora.config import Config
from recbole_ilora.data import DatasetError, check_atomic_files, item_titles
from recbole_ilora.data.llara import convert


def write_tiny(root: Path, name="tiny", titles=None, item_header="item_id:token\ttitle:token") -> Path:
    """4 users x 4 items, each user watching 3-4 items in order."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = [(u, i, t) for u in range(1, 5) for t, i in enumerate(range(1, 5 if u % 2 else 4))]
    inter = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    (folder / f"{name}.inter").write_text(inter, encoding="utf-8")
    titles = titles if titles is not None else {1: "Toy Story", 2: "Heat", 3: "Casino", 4: "Se7en"}
    item = item_header + "\n" + "".join(f"{i}\t{t}\n" for i, t in titles.items())
    (folder / f"{name}.item").write_text(item, encoding="utf-8")
    return root


def make(root: Path, name="tiny", **config_dict):
    settings = {
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "item_text_field": "title",
        "show_progress": False,
    }
    settings.update(config_dict)
    config = Config(model="SASRec", dataset=name, config_dict=settings)
    return create_dataset(config), config


def test_titles_of_a_tiny_dataset(tmp_path):
    dataset, config = make(write_tiny(tmp_path))
    titles = item_titles(dataset, config)
    assert titles[0] == "" and sorted(titles[1:]) == ["Casino", "Heat", "Se7en", "Toy Story"]
    assert titles[dataset.token2id("item_id", "2")] == "Heat"


def test_no_item_text_field(tmp_path):
    dataset, config = make(write_tiny(tmp_path), item_text_field=None)
    with pytest.raises(DatasetError, match=r"Dataset 'tiny'.*no 'item_text_field'.*tiny\.item"):
        item_titles(dataset, config)


def test_title_field_not_loaded(tmp_path):
    dataset, config = make(write_tiny(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp"]})
    with pytest.raises(DatasetError, match=r"Dataset 'tiny'.*'title' is not loaded.*tiny/tiny\.item.*load_col"):
        item_titles(dataset, config)


def test_title_field_missing_from_file(tmp_path):
    root = write_tiny(tmp_path, item_header="item_id:token\tname:token")
    dataset, config = make(root)
    with pytest.raises(DatasetError, match=r"'title' is not loaded"):
        item_titles(dataset, config)


def test_empty_titles(tmp_path):
    # Items 2 and 4 have blank titles: RecBole fills a blank token cell with its padding token "[PAD]".
    root = write_tiny(tmp_path, titles={1: "Toy Story", 2: " ", 3: "Casino", 4: ""})
    dataset, config = make(root)
    with pytest.raises(DatasetError, match=r"Dataset 'tiny': 2 of 4 items have an empty 'title' in .*tiny/tiny\.item.*item_id 2, 4"):
        item_titles(dataset, config)


def test_unknown_item_id_in_converted_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "id2name.txt").write_text("0::a\n1::b\n", encoding="utf-8")
    pd.DataFrame({"seq": [[0, 5] + [2] * 8], "len_seq": [2], "next": [1]}).to_pickle(src / "Test_data.df")
    with pytest.raises(DatasetError, match=r"Dataset 'tiny'.*unknown item id.*Test_data\.df, field 'seq'"):
        convert(src, tmp_path / "out", "tiny")


def test_empty_titles_in_token_seq_field(tmp_path):
    root = write_tiny(tmp_path, titles={1: "Toy Story", 2: "Heat", 3: "", 4: "Se7en"}, item_header="item_id:token\ttitle:token_seq")
    dataset, config = make(root)
    with pytest.raises(DatasetError, match=r"1 of 4 items have an empty 'title'.*item_id 3"):
        item_titles(dataset, config)


def test_ml100k_titles():
    config = Config(model="SASRec", dataset="ml-100k", config_dict={"show_progress": False})
    titles = item_titles(create_dataset(config), config)
    assert len(titles) == 1683
    assert {"The Usual Suspects (1995)", "Toy Story (1995)", "Il Postino (1994)"} <= set(titles)
    assert not any(title.endswith(", The") or ", The (" in title for title in titles)


def missing_config(tmp_path, name, **extra):
    return {"dataset": name, "data_path": str(tmp_path / name), "benchmark_filename": None, **extra}


def test_missing_ml1m_without_network_fails_fast(tmp_path):
    downloads = []
    with pytest.raises(DatasetError) as error:
        check_atomic_files(
            missing_config(tmp_path, "ml-1m"), reachable=lambda url: False, download=lambda *a: downloads.append(a)
        )
    message = str(error.value)
    assert "Dataset 'ml-1m' not found at" in message and str(tmp_path / "ml-1m") in message
    assert "ml-1m.inter" in message and "movie_title:token_seq" in message
    assert "https://recbole.s3-accelerate.amazonaws.com/ProcessedDatasets/MovieLens/ml-1m.zip" in message
    assert downloads == []


def test_missing_ml1m_with_network_downloads_itself(tmp_path):
    calls = []

    def fake_download(url, folder, name):
        calls.append((url, folder, name))
        folder.mkdir(parents=True)
        (folder / "ml-1m.inter").write_text("user_id:token\titem_id:token\n1\t1\n", encoding="utf-8")

    check_atomic_files(missing_config(tmp_path, "ml-1m"), reachable=lambda url: True, download=fake_download)
    assert calls == [(calls[0][0], tmp_path / "ml-1m", "ml-1m")] and calls[0][0].endswith("ml-1m.zip")


def test_download_that_yields_no_files_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="still missing"):
        check_atomic_files(
            missing_config(tmp_path, "ml-1m"), reachable=lambda url: True, download=lambda u, f, n: f.mkdir()
        )


def test_missing_lastfm_points_to_the_converter(tmp_path):
    # RecBole can download a 'lastfm', but it is not the authors' dataset: never download it for this name.
    with pytest.raises(DatasetError, match=r"recbole_ilora\.data\.llara.*--name lastfm"):
        check_atomic_files(missing_config(tmp_path, "lastfm"), reachable=lambda url: True, download=None)


def test_unknown_dataset_and_missing_benchmark_files(tmp_path):
    with pytest.raises(DatasetError, match="RecBole cannot download"):
        check_atomic_files(missing_config(tmp_path, "my-data"), reachable=lambda url: True)
    config = missing_config(tmp_path, "my-data", benchmark_filename=["train", "valid", "test"])
    with pytest.raises(DatasetError, match=r"benchmark files my-data\.train\.inter"):
        check_atomic_files(config, reachable=lambda url: True)


def test_present_files_pass(tmp_path):
    write_tiny(tmp_path)
    check_atomic_files(missing_config(tmp_path, "tiny"), reachable=None, download=None)
