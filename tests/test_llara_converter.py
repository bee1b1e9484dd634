"""The converter of the authors' pickled splits reproduces every authors' sample from the atomic files."""

from pathlib import Path

import pandas as pd
import pytest

from recbole_ilora.data import DatasetError
from recbole_ilora.data.llara import convert, main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llara"
LASTFM = SHARED / "lastfm"
PAD = 4606
FILES = {"train": "train_data.df", "valid": "Val_data.df", "test": "Test_data.df"}

needs_lastfm = pytest.mark.skipif(
    not LASTFM.is_dir(), reason=f"authors' LastFM split not found at {LASTFM} (shared data folder absent)"
)


def read_atomic(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [column.split(":")[0] for column in frame.columns]
    return frame


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("llara")
    summary = convert(LASTFM, out, "lastfm")
    return out / "lastfm", summary


def rebuild_samples(inter: pd.DataFrame, split: str) -> pd.DataFrame:
    """The authors' samples of one split, recomputed from the .inter: every prefix (train) or the last item."""
    rows = []
    part = inter[inter["user_id"].str.startswith(f"{split}_")]
    part = part.assign(t=part["timestamp"].astype(float)).sort_values("t", kind="stable")
    for _, items in part.groupby("user_id", sort=False)["item_id"]:
        items = items.astype(int).tolist()
        targets = range(len(items)) if split == "train" else [len(items) - 1]
        for k in targets:
            history = items[max(0, k - 10) : k]
            rows.append((history + [PAD] * (10 - len(history)), max(len(history), 1), items[k]))
    return pd.DataFrame(rows, columns=["seq", "len_seq", "next"])


@needs_lastfm
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_atomic_files_reproduce_every_sample(converted, split):
    folder, _ = converted
    theirs = pd.read_pickle(LASTFM / FILES[split])
    ours = rebuild_samples(read_atomic(folder / "lastfm.inter"), split)
    # Users are written in the order of the authors' files, so the samples come back in their order.
    assert len(ours) == len(theirs)
    assert [list(map(int, s)) for s in theirs["seq"]] == ours["seq"].tolist()
    assert theirs["len_seq"].tolist() == ours["len_seq"].tolist()
    assert theirs["next"].astype(int).tolist() == ours["next"].tolist()


@needs_lastfm
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_benchmark_files_are_the_authors_filtered_samples(converted, split):
    folder, summary = converted
    theirs = pd.read_pickle(LASTFM / FILES[split])
    theirs = theirs[theirs["len_seq"] >= 3]  # the authors' loader filter
    ours = read_atomic(folder / f"lastfm.{split}.inter")
    assert [[int(i) for i in s if i != PAD] for s in theirs["seq"]] == [
        [int(i) for i in s.split()] for s in ours["item_id_list"]
    ]
    assert theirs["next"].astype(int).tolist() == ours["item_id"].astype(int).tolist()
    assert summary.benchmark_rows[split] == len(theirs)


@needs_lastfm
def test_summary_and_names(converted):
    folder, summary = converted
    assert summary.users == {"train": 976, "valid": 122, "test": 122}
    assert summary.samples == {"train": 50800, "valid": 122, "test": 122}
    assert summary.items == 4606 and summary.interactions == 50800 + 2 * 122 + sum(
        len([i for i in s if i != PAD]) for f in ("Val_data.df", "Test_data.df") for s in pd.read_pickle(LASTFM / f)["seq"]
    )
    names = dict(line.rstrip("\n").split("::", 1) for line in open(LASTFM / "id2name.txt", encoding="utf-8"))
    items = read_atomic(folder / "lastfm.item")
    assert dict(zip(items["item_id"], items["title"])) == {k: v.strip() for k, v in names.items()}


@needs_lastfm
def test_recbole_loads_the_benchmark_split(converted):
    """RecBole's benchmark_filename mode gives exactly the authors' three splits, in one item id space."""
    from recbole.data import create_dataset

    import recbole_ilora  # noqa: F401
    from recbole_ilora.config import Config

    folder, _ = converted
    config = Config(
        model="SASRec",
        dataset="lastfm",
        config_file_list=[str(folder / "lastfm.benchmark.yaml")],
        config_dict={"show_progress": False},
    )
    dataset = create_dataset(config)
    train, valid, test = dataset.build()
    assert (len(train), len(valid), len(test)) == (47872, 122, 122)
    feat = test.inter_feat
    length = int(feat["item_length"][0])
    history = dataset.id2token("item_id", feat["item_id_list"][0][:length].numpy())
    assert history.tolist() == ["392", "225", "234", "576", "577", "272"]  # the authors' first test sample
    assert dataset.id2token("item_id", int(feat["item_id"][0])) == "578"
    from recbole_ilora.data import item_titles

    titles = item_titles(dataset, config)
    assert len(titles) == 4607 and titles[dataset.token2id("item_id", "3055")] == 'Lee "Scratch" Perry'


@needs_lastfm
def test_converted_lastfm_passes_every_check(converted):
    """The plugin's own checks accept the conversion, split by RecBole and as the authors' benchmark split."""
    from recbole.data import create_dataset

    import recbole_ilora  # noqa: F401
    from recbole_ilora.config import Config
    from recbole_ilora.data import check_atomic_files, check_dataset

    folder, _ = converted
    for config_files in ([], [str(folder / "lastfm.benchmark.yaml")]):
        config = Config(model="iLoRA", dataset="lastfm", config_file_list=config_files,
                        config_dict={"data_path": str(folder.parent), "show_progress": False, "state": "WARNING"})
        check_atomic_files(config)
        check_dataset(create_dataset(config), config)


def write_tiny(src: Path, names: list[str], samples: list[tuple[list[int], int]], split="Test_data.df"):
    src.mkdir(parents=True, exist_ok=True)
    (src / "id2name.txt").write_text("".join(f"{i}::{n}\n" for i, n in enumerate(names)), encoding="utf-8")
    pad = len(names)
    frame = pd.DataFrame(
        {
            "seq": [h + [pad] * (10 - len(h)) for h, _ in samples],
            "len_seq": [max(len(h), 1) for h, _ in samples],
            "next": [t for _, t in samples],
        }
    )
    frame.to_pickle(src / split)
    return src


def test_unknown_item_id_is_named(tmp_path):
    src = write_tiny(tmp_path / "src", ["a", "b", "c"], [([0, 1, 7], 2)])
    with pytest.raises(DatasetError, match=r"Dataset 'tiny'.*unknown item id.*Test_data\.df, field 'seq'.*\[7\]"):
        convert(src, tmp_path / "out", "tiny")
    src = write_tiny(tmp_path / "src", ["a", "b", "c"], [([0, 1, 2], 9)])
    with pytest.raises(DatasetError, match=r"Test_data\.df, field 'next'"):
        convert(src, tmp_path / "out", "tiny")


def test_empty_name_is_named(tmp_path):
    src = write_tiny(tmp_path / "src", ["a", "  ", "c"], [([0, 1, 2], 0)])
    with pytest.raises(DatasetError, match=r"Dataset 'tiny'.*empty item name.*id2name\.txt.*\[1\]"):
        convert(src, tmp_path / "out", "tiny")


def test_padding_inside_sequence_is_refused(tmp_path):
    src = write_tiny(tmp_path / "src", ["a", "b", "c", "d"], [([0, 1, 2], 3)])
    frame = pd.read_pickle(src / "Test_data.df")
    frame.at[0, "seq"] = [0, 4, 1] + [4] * 7
    frame.to_pickle(src / "Test_data.df")
    with pytest.raises(DatasetError, match="right-padded"):
        convert(src, tmp_path / "out", "tiny")


def test_ml100k_name_is_refused(tmp_path):
    src = write_tiny(tmp_path / "src", ["a", "b", "c", "d"], [([0, 1, 2], 3)])
    with pytest.raises(DatasetError, match="bundled ml-100k"):
        convert(src, tmp_path / "out", "ml-100k")


def test_cli_chains_train_users_and_quotes_names(tmp_path, capsys):
    names = ['"Glow Ball" - a game', "b", "c", "d", "e"]
    samples = [([], 0), ([0], 1), ([0, 1], 2), ([0, 1, 2], 3), ([], 4), ([4], 3)]  # two users
    src = write_tiny(tmp_path / "src", names, samples, split="train_data.df")
    summary = main([str(src), str(tmp_path / "out"), "--name", "tiny"])
    assert summary.users == {"train": 2} and summary.interactions == 6
    assert "2 users" in capsys.readouterr().out
    inter = read_atomic(tmp_path / "out" / "tiny" / "tiny.inter")
    assert inter.groupby("user_id", sort=False)["item_id"].agg(" ".join).tolist() == ["0 1 2 3", "4 3"]
    items = pd.read_csv(tmp_path / "out" / "tiny" / "tiny.item", sep="\t", dtype=str, engine="python")
    assert items.iloc[0, 1] == names[0]  # read back as RecBole reads it (pandas, default quoting)
