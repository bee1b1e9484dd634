"""Convert the LLaRA/iLoRA authors' pickled splits into RecBole atomic files.

The authors (LLaRA, ljy0ustc/LLaRA; iLoRA, AkaliKong/iLoRA, ``data/ref/<dataset>/``) ship samples, not
interactions: pandas pickles ``train_data.df``, ``Val_data.df``, ``Test_data.df`` with columns ``seq``
(the 10 most recent items, oldest first, right-padded with the padding id = number of items), ``len_seq``
and ``next`` (the target), plus item names (``id2name.txt`` lines ``0::Morcheeba``; MovieLens: ``u.item``).
There is no user id. What the files contain (verified on LastFM by this converter and its test):

- The split is by *user*. ``train_data.df`` lists, user after user, *every* prefix of each training
  user's sequence, starting with an empty history (``len_seq`` is then 1, not 0): sample i+1's ``seq`` is
  sample i's ``seq`` + ``next``, last 10 kept. Chaining samples recovers each training user's full
  sequence (LastFM: 976 users, 50,800 interactions, every train sample reproduced).
- ``Val_data.df`` / ``Test_data.df`` hold one sample per held-out user (LastFM: 122 + 122 users, none
  continuing a training user or each other). Only the last <= 10 items + target of those users exist.
- The authors' loaders keep samples with ``len_seq >= 3`` only, and draw 19 negatives per sample afresh at
  every access (items not in the sample's history nor the target).

Output, in ``<out>/<name>/``:

- ``<name>.inter`` (``user_id:token item_id:token [rating:float] timestamp:float``): one row per known
  interaction, training users' full sequences then held-out users' partial ones, timestamps = global
  order. RecBole's sequential augmentation over a training user reproduces the authors' train samples
  (those with a non-empty history), and the last 10 items before a held-out user's last item are exactly
  the authors' val/test ``seq``. RecBole's default leave-one-out split on this file is *not* the authors'
  split (it tests every user's last item); use the benchmark files for that.
- ``<name>.item`` (``item_id:token title:token``): every item of the names file. Item tokens are the
  authors' ids (LastFM, Steam), so names map 1:1; for MovieLens they are the MovieLens movie ids
  (authors' id + 1), which are also the item tokens of RecBole's bundled ml-100k.
- ``<name>.train.inter``, ``<name>.valid.inter``, ``<name>.test.inter`` (whichever splits exist;
  ``user_id:token item_id_list:token_seq item_id:token``): the authors' samples as given, filtered with
  their ``len_seq >= 3`` rule, for RecBole's ``benchmark_filename`` mechanism, and
  ``<name>.benchmark.yaml`` with the settings it needs. Evaluate on the authors' split with::

      python run_recbole_ilora.py --model=SASRec --dataset=lastfm \\
          --config_files=<out>/lastfm/lastfm.benchmark.yaml

  i.e. ``benchmark_filename: [train, valid, test]``, ``alias_of_item_id: [item_id_list]`` (so the
  history lists share the item id space) and ``load_col`` including ``item_id_list``.

Not reproducible in RecBole: the authors' candidates (re-drawn at every access, excluding the sample's
history); RecBole's uni19 sampler draws its own 19 negatives and, in benchmark mode, excludes only the
held-out user's earlier *targets* (none: they have no training rows), so history items can be drawn.
Names are written in full: the authors split ``id2name.txt`` lines on every "::" and keep the second
piece, truncating names that contain "::" (Steam: "Depths of Fear :: Knossos" -> "Depths of Fear").
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from recbole_ilora.data.item_text import DatasetError, clean_title

__all__ = ["ConversionSummary", "convert", "read_item_names", "read_samples", "main"]

SPLIT_FILES = {"train": "train_data.df", "valid": "Val_data.df", "test": "Test_data.df"}
DOMAINS = {"lastfm": "artist", "steam": "game", "movielens": "movie"}
MIN_LEN_SEQ = 3  # the authors' loaders: train_data[train_data['len_seq'] >= 3]


@dataclass
class ConversionSummary:
    name: str
    users: dict = field(default_factory=dict)  # split -> users reconstructed
    samples: dict = field(default_factory=dict)  # split -> authors' samples read
    benchmark_rows: dict = field(default_factory=dict)  # split -> samples written (len_seq >= 3)
    items: int = 0
    items_used: int = 0
    interactions: int = 0
    avg_sequence_length: float = 0.0
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"Converted '{self.name}': {sum(self.users.values())} users "
            f"({', '.join(f'{k} {v}' for k, v in self.users.items())}), {self.items} items "
            f"({self.items_used} occurring), {self.interactions} interactions, "
            f"average sequence length {self.avg_sequence_length:.2f}.",
            "Authors' samples read and reproduced from the atomic files: "
            + ", ".join(f"{k} {v}" for k, v in self.samples.items()) + ".",
            "Benchmark rows written (authors' len_seq >= 3 filter): "
            + ", ".join(f"{k} {v}" for k, v in self.benchmark_rows.items()) + ".",
        ]
        return "\n".join(lines + [f"Note: {note}" for note in self.notes])


def _detect_format(src: Path) -> str:
    if (src / "u.item").is_file():
        return "movielens"
    if (src / "id2name.txt").is_file():
        return "id2name"
    raise DatasetError(
        f"{src} holds neither id2name.txt (LastFM/Steam item names) nor u.item (MovieLens): not an "
        f"authors' data folder (expected e.g. <iLoRA repo>/data/ref/lastfm)."
    )


def read_item_names(src: Path, dataset: str) -> tuple[dict[int, str], Path]:
    """Authors' item id -> name, and the file read. Errors on malformed lines and empty names."""
    fmt = _detect_format(src)
    names: dict[int, str] = {}
    if fmt == "id2name":
        path = src / "id2name.txt"
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if not line:
                    continue
                item, sep, name = line.partition("::")
                if not sep or not item.strip().isdigit():
                    raise DatasetError(f"Dataset '{dataset}': {path} line {number} is not 'ID::NAME': {line!r}")
                names[int(item)] = name.strip()
    else:
        path = src / "u.item"
        with open(path, encoding="ISO-8859-1") as f:  # MovieLens-100K's encoding, as the authors read it
            for line in f:
                parts = line.rstrip("\n").split("|")
                if len(parts) > 1:
                    names[int(parts[0]) - 1] = clean_title(parts[1])  # authors' ids are MovieLens ids - 1
    empty = sorted(item for item, name in names.items() if not name)
    if empty:
        raise DatasetError(
            f"Dataset '{dataset}': {len(empty)} empty item name(s) in {path} (field: name), e.g. item ids "
            f"{empty[:10]}. Every item needs a name for the prompts: fix those lines."
        )
    bad = sorted(item for item, name in names.items() if "\t" in name or "\n" in name)
    if bad:
        raise DatasetError(f"Dataset '{dataset}': item names with tabs in {path}, item ids {bad[:10]}.")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(
            f"Dataset '{dataset}': item ids in {path} are not 0..{len(names) - 1}; the authors' padding id "
            f"is the number of items, so gaps would make it ambiguous."
        )
    return names, path


def _split_item(value, with_rating: bool):
    # MovieLens entries are (item, rating) tuples; LastFM/Steam entries are plain ids.
    if with_rating:
        return int(value[0]), float(value[1])
    return int(value), None


def read_samples(path: Path, dataset: str, names: dict[int, str]) -> pd.DataFrame:
    """One authors' split as ``history`` (unpadded ids, oldest first), ``target``, ratings, ``len_seq``."""
    frame = pd.read_pickle(path)
    missing = {"seq", "len_seq", "next"} - set(frame.columns)
    if missing:
        raise DatasetError(f"Dataset '{dataset}': {path} lacks column(s) {sorted(missing)} (field: seq/len_seq/next).")
    pad = len(names)
    with_rating = len(frame) > 0 and isinstance(frame["next"].iloc[0], tuple)
    histories, ratings, targets, target_ratings = [], [], [], []
    for row, (seq, target) in enumerate(zip(frame["seq"], frame["next"])):
        entries = [_split_item(value, with_rating) for value in seq]
        items = [item for item, _ in entries]
        length = next((k for k, item in enumerate(items) if item == pad), len(items))
        if any(item != pad for item in items[length:]):
            raise DatasetError(
                f"Dataset '{dataset}': {path} row {row}, field 'seq': padding id {pad} is followed by real "
                f"items {items}; the authors' sequences are right-padded."
            )
        histories.append(items[:length])
        ratings.append([rating for _, rating in entries[:length]])
        target_item, target_rating = _split_item(target, with_rating)
        targets.append(target_item)
        target_ratings.append(target_rating)
    out = pd.DataFrame(
        {
            "history": histories,
            "ratings": ratings,
            "target": np.asarray(targets, dtype=np.int64),
            "target_rating": target_ratings,
            "len_seq": frame["len_seq"].to_numpy(dtype=np.int64),
            "window": [len(seq) for seq in frame["seq"]],
        }
    )
    for column, values in (("seq", [i for h in histories for i in h]), ("next", targets)):
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise DatasetError(
                f"Dataset '{dataset}': {len(unknown)} unknown item id(s) in {path}, field '{column}', e.g. "
                f"{unknown[:10]}: not in the names file (ids 0..{pad - 1}, padding {pad}). The split and the "
                f"names file do not belong together."
            )
    expected = np.maximum(out["history"].map(len).to_numpy(), 1)  # empty history is stored as len_seq 1
    wrong = np.flatnonzero(expected != out["len_seq"].to_numpy())
    if len(wrong):
        raise DatasetError(
            f"Dataset '{dataset}': {path}, field 'len_seq' disagrees with the unpadded 'seq' in {len(wrong)} "
            f"row(s), e.g. rows {wrong[:10].tolist()}."
        )
    out.attrs["with_rating"] = with_rating
    return out


def _chain_users(samples: pd.DataFrame) -> list[dict]:
    """Group consecutive samples into users: sample i+1 continues i if its history is i's + target."""
    users: list[dict] = []
    previous: list[int] | None = None  # the previous sample's history + target
    for history, target, window in zip(samples["history"], samples["target"], samples["window"]):
        if previous is None or history != previous[-window:]:
            users.append({"start": list(history), "targets": []})
        users[-1]["targets"].append(int(target))
        previous = list(history) + [int(target)]
    return users


def _users_of_split(split: str, samples: pd.DataFrame) -> tuple[list[dict], pd.DataFrame]:
    """Per-user known sequences (items, ratings), and the samples with their user index added."""
    if split == "train":
        chained = _chain_users(samples)
    else:  # one held-out user per sample (verified: they do not continue each other)
        chained = [{"start": list(h), "targets": [int(t)]} for h, t in zip(samples["history"], samples["target"])]
    users, sample_user, row = [], [], 0
    for index, user in enumerate(chained):
        n = len(user["targets"])
        ratings = list(samples["ratings"].iloc[row]) + list(samples["target_rating"].iloc[row : row + n])
        users.append({"items": user["start"] + user["targets"], "ratings": ratings})
        sample_user += [index] * n
        row += n
    samples = samples.assign(user=sample_user)
    return users, samples


def _write_atomic(path: Path, frame: pd.DataFrame) -> None:
    # QUOTE_MINIMAL quotes names containing '"' the way RecBole's reader (pandas, default quoting) expects.
    frame.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")


def convert(src, out, name: str, domain: str | None = None) -> ConversionSummary:
    """Convert the authors' folder ``src`` into ``<out>/<name>/`` (see the module docstring)."""
    src, out = Path(src), Path(out)
    if name == "ml-100k":
        raise DatasetError(
            "Refusing --name ml-100k: RecBole 1.2.1 always loads its bundled ml-100k for that name and would "
            "ignore the converted files. Use another name, e.g. --name ml-100k-llara."
        )
    fmt = _detect_format(src)
    names, names_path = read_item_names(src, name)
    token = (lambda i: str(i + 1)) if fmt == "movielens" else str
    splits = {split: src / file for split, file in SPLIT_FILES.items() if (src / file).is_file()}
    if not splits:
        raise DatasetError(f"Dataset '{name}': no split file ({', '.join(SPLIT_FILES.values())}) in {src}.")
    summary = ConversionSummary(name=name, items=len(names))
    missing = [file for split, file in SPLIT_FILES.items() if split not in splits]
    if missing:
        summary.notes.append(
            f"missing split file(s) {missing}: benchmark mode (benchmark_filename) needs train, valid and "
            f"test; the .inter holds only the users of the splits present."
        )

    dataset_dir = out / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with_rating = False
    inter_parts, bench_columns = [], ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    clock, window = 0, 0
    for split, path in splits.items():
        samples = read_samples(path, name, names)
        with_rating = with_rating or samples.attrs["with_rating"]
        users, samples = _users_of_split(split, samples)
        window = max(window, int(samples["window"].max()))
        user_tokens = [f"{split}_{k}" for k in range(len(users))]
        lengths = [len(user["items"]) for user in users]
        n = sum(lengths)
        inter_parts.append(
            pd.DataFrame(
                {
                    "user_id:token": np.repeat(user_tokens, lengths),
                    "item_id:token": [token(i) for user in users for i in user["items"]],
                    "rating:float": [r for user in users for r in user["ratings"]],
                    "timestamp:float": np.arange(clock, clock + n, dtype=np.float64),
                }
            )
        )
        clock += n
        summary.users[split] = len(users)
        summary.samples[split] = len(samples)
        kept = samples[samples["len_seq"] >= MIN_LEN_SEQ]
        summary.benchmark_rows[split] = len(kept)
        _write_atomic(
            dataset_dir / f"{name}.{split}.inter",
            pd.DataFrame(
                {
                    bench_columns[0]: [user_tokens[u] for u in kept["user"]],
                    bench_columns[1]: [" ".join(token(i) for i in h) for h in kept["history"]],
                    bench_columns[2]: [token(i) for i in kept["target"]],
                },
                columns=bench_columns,
            ),
        )
        if split != "train":
            summary.notes.append(
                f"{split}: {len(users)} held-out users with only their last <= {samples['window'].max()} items "
                f"+ target (their earlier interactions are not in the authors' files)."
            )
    inter = pd.concat(inter_parts, ignore_index=True)
    if not with_rating:
        inter = inter.drop(columns="rating:float")
    _write_atomic(dataset_dir / f"{name}.inter", inter)
    item_frame = pd.DataFrame(
        {"item_id:token": [token(i) for i in sorted(names)], "title:token": [names[i] for i in sorted(names)]}
    )
    _write_atomic(dataset_dir / f"{name}.item", item_frame)

    domain = domain or DOMAINS.get(name, DOMAINS["movielens"] if fmt == "movielens" else None)
    bench_config = {
        "data_path": str(out.resolve()),
        "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id", "item_id_list"], "item": ["item_id", "title"]},
        "item_text_field": "title",
        "MAX_ITEM_LIST_LENGTH": window,  # the authors' history length (10)
    }
    if domain:
        bench_config["prompt_domain"] = domain
    with open(dataset_dir / f"{name}.benchmark.yaml", "w", encoding="utf-8") as f:
        f.write(
            f"# RecBole settings to train/evaluate on the authors' split of '{name}' as given (written by\n"
            f"# recbole_ilora.data.llara). Use: --dataset={name} --config_files={dataset_dir / f'{name}.benchmark.yaml'}\n"
        )
        yaml.safe_dump(bench_config, f, sort_keys=False)

    lengths = inter.groupby("user_id:token", sort=False).size()
    summary.interactions = len(inter)
    summary.items_used = inter["item_id:token"].nunique()
    summary.avg_sequence_length = float(lengths.mean())
    if "train" in splits:
        empty = summary.samples["train"] - summary.benchmark_rows["train"]
        summary.notes.append(
            f"train: {empty} samples with len_seq < {MIN_LEN_SEQ} are in the .inter (as prefixes) but not in "
            f"{name}.train.inter, following the authors' loader (RecBole's own augmentation of the .inter "
            f"yields every prefix with >= 1 history item instead)."
        )
    if fmt == "movielens":
        summary.notes.append("item tokens are MovieLens movie ids (= authors' id + 1 = RecBole ml-100k tokens).")
    return summary


def main(argv=None) -> ConversionSummary:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_ilora.data.llara",
        description="Convert the LLaRA/iLoRA authors' data folder (data/ref/<dataset>) into RecBole atomic files.",
    )
    parser.add_argument("src", type=Path, help="authors' folder with *_data.df and id2name.txt or u.item")
    parser.add_argument("out", type=Path, help="output data_path; files go to OUT/NAME/")
    parser.add_argument("--name", required=True, help="RecBole dataset name (e.g. lastfm, steam, ml-100k-llara)")
    parser.add_argument("--domain", default=None, help="prompt domain (movie/artist/game); default from the name")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.out, args.name, args.domain)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(summary)
    print(f"Files written to {args.out / args.name}/")
    return summary


if __name__ == "__main__":
    main()
