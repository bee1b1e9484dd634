"""Refuse bad atomic files before RecBole loads them: one message naming file, field, count and fix.

RecBole 1.2.1 repairs bad data without a word, and each repair changes the numbers this plugin
compares head to head: a blank float cell (a timestamp, a rating) becomes the column mean, which
reorders sequences; a blank id drops its row; interactions of items absent from ``<dataset>.item``
are dropped (``filter_inter_by_user_or_item``); of a duplicated item id only the first row is kept.
:func:`check_raw_files` reads every atomic file RecBole will read, as RecBole reads it
(:mod:`~recbole_ilora.data.atomic_reader`), and raises
:class:`~recbole_ilora.data.item_text.DatasetError` on the first problem. All checks are vectorised
(ml-1m's million interactions take about a second).

Refused, besides what the reader refuses (empty, header-only, unreadable, malformed or ragged files):

- a missing value in any loaded interaction column, in a user/item id, in a float feature (RecBole
  would invent the mean) or in the item title (``item_text_field``);
- a float cell that is not a finite number;
- an id with leading or trailing whitespace (``"5 "`` and ``"5"`` would be two items);
- an id on more than one row of ``.item``/``.user``;
- interactions of items (users) absent from ``.item`` (``.user``); with the explicit opt-in
  ``drop_interactions_of_unknown_items: true`` (``..._users``) RecBole drops them and the drop is
  logged as a warning with its count;
- filters (``user_inter_num_interval``, ``item_inter_num_interval``, ``val_interval``,
  ``rm_dup_inter``) that would leave nothing; when they remove part, the counts are logged;
- ``max_history`` above ``MAX_ITEM_LIST_LENGTH``: the prompt could never show that many items.

Accepted on purpose: repeated (user, item) rows, even with the same timestamp, which RecBole treats
as re-interactions (``rm_dup_inter`` is its explicit switch to remove them); histories longer than
``MAX_ITEM_LIST_LENGTH``, which RecBole truncates to the most recent items by design; negative
ratings and timestamps (the scale is the dataset's); blank token features of items and users other
than ids and titles (RecBole's padding token means "unknown", nothing is invented); items nobody
interacted with (they stay candidates). Whether the items suffice for ``topk``, uniN evaluation and
``num_candidates`` is checked on the loaded dataset by
:func:`~recbole_ilora.data.candidate_pool.check_dataset`.
"""

from __future__ import annotations

from logging import getLogger
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from recbole_ilora.data.atomic_reader import SHOWN, AtomicFile, file_error, plural, read_atomic_file, setting
from recbole_ilora.data.columns import check_time_column
from recbole_ilora.data.item_text import DatasetError

__all__ = ["check_raw_files"]

# What RecBole 1.2.1 does with a missing value of each type (Dataset._fill_nan).
_FILLS = {
    "float": "RecBole would fill them with the column mean",
    "token": "RecBole would give them its padding token",
    "token_seq": "RecBole would make them empty sequences",
    "float_seq": "RecBole would make them empty sequences",
}


def _id_fields(config) -> tuple[str, str]:
    return setting(config, "USER_ID_FIELD", "user_id"), setting(config, "ITEM_ID_FIELD", "item_id")


def _where(values: pd.Series, predicate) -> np.ndarray:
    """``predicate`` of every present value, computed once per distinct value (ids repeat a lot)."""
    codes, uniques = pd.factorize(values)
    hits = np.append(predicate(pd.Series(uniques, dtype=object)).to_numpy(dtype=bool), False)
    return hits[codes]  # code -1 (missing) picks the appended False


def _check_values(file: AtomicFile, config) -> None:
    """Missing values RecBole would fill or drop, numbers that are none, stray whitespace in ids, duplicates."""
    uid, iid = _id_fields(config)
    ids = {"inter": [uid, iid], "user": [uid], "item": [iid]}.get(file.source, [])
    for field in ids:
        if field not in file.frame:
            raise file_error(file.dataset, file.path, f"no '{field}' column is loaded", f"Every {file.source} file "
                             f"needs its id column '{field}:token', listed in load_col['{file.source}']")
    title = setting(config, "item_text_field") if file.source == "item" else None
    for field in file.frame:
        values, ftype = file.frame[field], file.types[field]
        missing = values.isna().to_numpy().copy()
        if field == title:
            missing |= _where(values, lambda texts: texts.str.strip() == "")
        if missing.any() and (file.source == "inter" or field in ids or field == title or ftype == "float"):
            why = ("RecBole would drop those rows" if field in ids else "every item needs a title for the prompt"
                   if field == title else _FILLS[ftype])
            raise file.refuse(field, int(missing.sum()), "row", "without a value", file.lines[missing], why,
                              "Fill in the missing values or remove those rows")
        if ftype in ("float", "float_seq"):
            _check_numbers(file, field, setting(config, "seq_separator", " "))
        if field in ids:
            padded = _where(values, lambda texts: texts.str.strip() != texts)
            if padded.any():
                example = values[padded].iloc[0]
                raise file.refuse(field, int(padded.sum()), "id", "with leading or trailing whitespace",
                                  file.lines[padded], f"RecBole would read {example!r} and {example.strip()!r} "
                                  "as two different ids", "Strip the whitespace")
    if file.source in ("item", "user"):
        repeated = file.frame[ids[0]].duplicated(keep=False).to_numpy()
        if repeated.any():
            raise file.refuse(ids[0], int(file.frame[ids[0]][repeated].nunique()), f"{file.source} id", "on more "
                              "than one row", file.lines[repeated], "RecBole would keep the first row of each",
                              f"Keep one row per {file.source}")


def _check_numbers(file: AtomicFile, field: str, seq_separator: str) -> None:
    present = file.frame[field].dropna()
    if file.types[field] == "float_seq":
        present = present.str.split(seq_separator).explode()
        present = present[present != ""]
    numbers = pd.to_numeric(present, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if bad.any():
        rows = np.unique(file.frame.index.get_indexer(present.index[bad]))
        raise file.refuse(field, len(rows), "row", f"without a finite number (e.g. {str(present[bad].iloc[0])!r})",
                          file.lines[rows], "an infinite or unparsable value breaks orderings, means and "
                          "normalisation", "Write finite numbers there")


def _unknown_rows(inter: AtomicFile, field: str, known: pd.Index, seq_separator: str) -> tuple:
    """Rows of ``inter`` whose ``field`` (a token or a token sequence) names an id outside ``known``; the ids."""
    values = inter.frame[field].dropna()
    if inter.types[field] == "token_seq":
        values = values.str.split(seq_separator).explode()
        values = values[values.notna() & (values != "")]
    unknown = ~values.isin(known).to_numpy()
    rows = np.zeros(len(inter.frame), dtype=bool)
    rows[inter.frame.index.get_indexer(values.index[unknown].unique())] = True
    return rows, pd.unique(values[unknown])


def _check_references(inter_files: list, features: dict, config) -> list[np.ndarray]:
    """Refuse interactions of ids absent from ``.item``/``.user``; opted in, return the rows RecBole drops."""
    drops = [np.zeros(len(file.frame), dtype=bool) for file in inter_files]
    uid, iid = _id_fields(config)
    for source, field in (("item", iid), ("user", uid)):
        if source not in features:
            continue  # no feature file loaded: RecBole filters nothing
        feature, opt_in = features[source], f"drop_interactions_of_unknown_{source}s"
        known = pd.Index(feature.frame[field])
        fields = [field] + [alias for alias in setting(config, f"alias_of_{source}_id", []) if alias != field]
        for inter, drop in zip(inter_files, drops):
            for alias in [alias for alias in fields if alias in inter.frame]:
                rows, ids = _unknown_rows(inter, alias, known, setting(config, "seq_separator", " "))
                if not rows.any():
                    continue
                shown = ", ".join(map(str, ids[:SHOWN])) + (", ..." if len(ids) > SHOWN else "")
                problem = f"naming {plural(len(ids), source)} absent from {feature.path} ({source} {shown})"
                recbole_drops = (alias == field and setting(config, "filter_inter_by_user_or_item", True) is True
                                 and not setting(config, "benchmark_filename"))
                if not setting(config, opt_in):
                    why = "RecBole would drop them silently" if recbole_drops else f"they would lack {source} features"
                    fix = f"Add those {source}s to {feature.path.name}, remove their rows, or set {opt_in}: true"
                    raise inter.refuse(alias, int(rows.sum()), "row", problem, inter.lines[rows], why, fix)
                if not recbole_drops:
                    why = (f"{opt_in} is set, but RecBole drops rows only by '{field}', with "
                           "filter_inter_by_user_or_item: true and without benchmark_filename")
                    fix = f"Add those {source}s to {feature.path.name} or remove their rows"
                    raise inter.refuse(alias, int(rows.sum()), "row", problem, inter.lines[rows], why, fix)
                getLogger().warning(
                    f"Dataset '{inter.dataset}': {opt_in} is true: RecBole drops {int(rows.sum())} of {len(rows)} "
                    f"interactions of {inter.path}, those of {plural(len(ids), source)} absent from {feature.path}."
                )
                drop |= rows
    return drops


def _parse_interval(interval):
    from recbole.data.dataset import Dataset

    return Dataset._parse_intervals_str(SimpleNamespace(logger=getLogger()), interval)  # RecBole's own parser


def _within(values: np.ndarray, parsed) -> np.ndarray:
    from recbole.data.dataset import Dataset

    return Dataset._within_intervals(None, values, parsed)


def _by_value(frame: pd.DataFrame, types: dict, field: str, interval) -> pd.DataFrame:
    """Dataset._filter_by_field_value for one table."""
    if field not in frame:
        return frame
    if types[field] == "float":
        return frame[_within(frame[field].to_numpy(), _parse_interval(interval))]
    return frame[frame[field].isin(interval).to_numpy()]


def _by_inter_num(frame: pd.DataFrame, feats: dict, id_fields: dict, intervals: dict) -> tuple:
    """Dataset._filter_by_inter_num: ban ids out of their interval, drop their rows, recount until stable."""
    while any(intervals.values()):
        banned = {}
        for source, field in id_fields.items():
            interval, counts = intervals[source], frame[field].value_counts()
            banned[source] = counts.index[~_within(counts.to_numpy(), interval)] if interval else pd.Index([])
            if interval and source in feats:  # feature rows of ids with too few interactions go as well
                ids = feats[source][field]
                too_few = counts.reindex(ids).fillna(0).to_numpy() < interval[0][1]
                banned[source] = banned[source].union(ids[too_few])
        if not any(len(ids) for ids in banned.values()):
            break
        feats = {source: table[~table[id_fields[source]].isin(banned[source])] for source, table in feats.items()}
        frame = frame[~np.logical_or.reduce([frame[f].isin(banned[s]).to_numpy() for s, f in id_fields.items()])]
    return frame, feats


def _check_filters(inter: AtomicFile, features: dict, dropped: np.ndarray, config) -> None:
    """Replay RecBole's ``_data_filtering`` on the raw rows: refuse settings that leave nothing, log removals."""
    uid, iid = _id_fields(config)
    id_fields = {"user": uid, "item": iid}
    frame = inter.frame[~dropped]
    feats = {source: features[source].frame for source in id_fields if source in features}
    used = {key: setting(config, key) for key in ("rm_dup_inter", "val_interval", "user_inter_num_interval",
                                                  "item_inter_num_interval") if setting(config, key) is not None}
    if "rm_dup_inter" in used:
        frame = frame.drop_duplicates(subset=[uid, iid])  # which duplicate is kept changes no count
    for field, interval in used.get("val_interval", {}).items():
        frame = _by_value(frame, inter.types, field, interval)
        feats = {source: _by_value(table, features[source].types, field, interval) for source, table in feats.items()}
    intervals = {source: _parse_interval(used.get(f"{source}_inter_num_interval")) for source in id_fields}
    frame, feats = _by_inter_num(frame, feats, id_fields, intervals)
    empty = ["interactions"] * frame.empty + [f"rows of {features[s].path.name}" for s, t in feats.items() if t.empty]
    if empty:
        raise file_error(inter.dataset, inter.path, f"RecBole's filters {used} would leave no {' and no '.join(empty)} "
                         f"(of {len(inter.frame)} interactions)", "Loosen them: user_inter_num_interval and "
                         "item_inter_num_interval keep the ids whose number of interactions lies inside the interval")
    split = (setting(config, "eval_args", {}) or {}).get("split") or {}
    if split.get("LS") == "valid_and_test":
        # Leave-one-out holds out each user's last two items: a user with fewer than 3 has nothing to train on.
        counts = frame[uid].value_counts()
        if (counts >= 3).sum() == 0:
            raise file_error(inter.dataset, inter.path, f"after RecBole's filters {used}, no user has 3 or more "
                             f"interactions (the most is {int(counts.max())}), so the leave-one-out split (the last item "
                             "tests, the second-to-last validates) leaves nothing to train on", "Use a dataset "
                             "with longer histories, or another split: --eval_args=\"{'split': {'RS': [0.8, 0.1, 0.1]}}\"")
    if len(frame) < len(inter.frame) - int(dropped.sum()):
        getLogger().info(
            f"Dataset '{inter.dataset}': RecBole's filters {used} keep {len(frame)} of {len(inter.frame)} "
            f"interactions of {inter.path} ({frame[uid].nunique()} of {inter.frame[uid].nunique()} users, "
            f"{frame[iid].nunique()} of {inter.frame[iid].nunique()} items)."
        )


def _check_settings(config) -> None:
    max_history, max_length = setting(config, "max_history"), setting(config, "MAX_ITEM_LIST_LENGTH")
    if max_history is not None and max_length is not None and max_history > max_length:
        raise DatasetError(
            f"Dataset '{config['dataset']}': max_history={max_history} exceeds MAX_ITEM_LIST_LENGTH={max_length}: "
            f"RecBole keeps the {max_length} most recent items of each history, so no prompt could show "
            f"{max_history}. Lower max_history to {max_length} or less, or raise MAX_ITEM_LIST_LENGTH (the "
            f"input length of every sequential model, SASRec included)."
        )


def check_raw_files(config) -> None:
    """Raise :class:`DatasetError` on the first problem of the atomic files RecBole will load for ``config``.

    ``config["data_path"]`` is the dataset folder (RecBole's Config has joined the dataset name).
    """
    _check_settings(config)
    folder, name = Path(config["data_path"]), config["dataset"]
    benchmark = setting(config, "benchmark_filename")
    paths = [folder / f"{name}.{part}.inter" for part in benchmark] if benchmark else [folder / f"{name}.inter"]
    inter_files = [read_atomic_file(path, "inter", config) for path in paths]
    if any(file is None for file in inter_files):
        raise DatasetError(f"Dataset '{name}': load_col loads no field of {paths[0]}. List the interaction "
                           f"fields in load_col['inter'], e.g. [user_id, item_id, timestamp].")
    features = {}
    for source in ["user", "item"] + list(setting(config, "additional_feat_suffix", [])):
        path = folder / f"{name}.{source}"
        file = read_atomic_file(path, source, config) if path.is_file() else None
        if file is not None:
            features[source] = file
    for file in inter_files + list(features.values()):
        _check_values(file, config)
    drops = _check_references(inter_files, features, config)
    if not benchmark:  # RecBole filters nothing in benchmark mode
        _check_filters(inter_files[0], features, drops[0], config)
        check_time_column(config, inter_files[0].path, inter_files[0].types, inter_files[0].frame.columns)
