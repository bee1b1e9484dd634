"""Check the loaded dataset against the ranking settings before anything trains or pretrains.

Three settings need enough items, and a small or dense dataset breaks each in its own way, late
(after a gate encoder was pretrained) or silently:

- ``topk``: RecBole ranks every item id, so a k above the number of items ends in ``torch.topk``'s
  "selected index k out of range" at the first evaluation;
- ``eval_args`` mode ``uniN``/``popN``: N negatives per user; the papers' 20 candidates are the target
  and 19 items the user never interacted with. A user with fewer than N such items cannot get them:
  RecBole's sampler then repeats items, repeats collapse in its score matrix and the user is ranked
  among fewer candidates than the protocol says. A k of N+1 or more gives Hit@k = 1 for every user;
- ``num_candidates`` (LLM prompts): each training prompt needs ``num_candidates - 1`` distinct
  negatives other than the target and, with ``exclude_history_from_negatives``, other than the
  ``max_history`` most recent items; otherwise ``torch.multinomial`` fails during training.

:func:`check_dataset` raises :class:`~recbole_ilora.data.item_text.DatasetError` naming the setting
to lower and the largest value that works.
"""

from __future__ import annotations

import numpy as np

from recbole_ilora.data.item_text import DatasetError

__all__ = ["check_dataset", "unseen_items_per_user"]


def _column(feat, field: str) -> np.ndarray:
    values = feat[field]
    return values.numpy() if hasattr(values, "numpy") else values.to_numpy()


def unseen_items_per_user(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Internal ids of the users with interactions and how many items each never interacted with.

    Items of every item-id field of the interactions count (``item_id`` and its aliases, such as the
    ``item_id_list`` histories of benchmark files).
    """
    inter = dataset.inter_feat  # a DataFrame until dataset.build(), an Interaction after
    user_ids = _column(inter, dataset.uid_field)
    users, items = [user_ids], [_column(inter, dataset.iid_field)]
    for field in dataset.alias.get("item_id", []):
        if field != dataset.iid_field and field in inter.columns:
            sequences = _column(inter, field)
            if sequences.dtype == object:  # one array per row
                lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
                users.append(np.repeat(user_ids, lengths))
                items.append(np.concatenate(list(sequences)) if lengths.sum() else np.zeros(0, np.int64))
            else:
                filled = sequences != 0  # 0 is the padding item
                users.append(np.broadcast_to(user_ids[:, None], sequences.shape)[filled])
                items.append(sequences[filled])
    keys = np.unique(np.concatenate(users).astype(np.int64) * dataset.item_num + np.concatenate(items))
    seen = np.bincount(keys // dataset.item_num, minlength=dataset.user_num)
    active = np.flatnonzero(seen)
    return active, (dataset.item_num - 1) - seen[active]


def _examples(dataset, users: np.ndarray, counts: np.ndarray) -> str:
    order = np.argsort(counts, kind="stable")[:5]
    tokens = dataset.id2token(dataset.uid_field, users[order])
    return ", ".join(f"user {token}: {count}" for token, count in zip(tokens, counts[order]))


def check_dataset(dataset, config) -> None:
    """Raise :class:`DatasetError` unless ``topk``, uniN evaluation and ``num_candidates`` fit the dataset."""
    name, num_items = dataset.dataset_name, dataset.item_num - 1
    inter_file = f"{dataset.dataset_path}/{name}.inter"
    topk = max(config["topk"])
    if topk > num_items:
        raise DatasetError(
            f"Dataset '{name}': topk={config['topk']} asks for the top {topk} of the {num_items} items loaded from "
            f"{inter_file} (RecBole would stop with 'selected index k out of range' at the first evaluation). "
            f"Lower topk to at most {num_items}."
        )
    users, unseen = unseen_items_per_user(dataset)
    for phase in ("valid", "test"):
        sample_num = (config[f"{phase}_neg_sample_args"] or {}).get("sample_num")
        if not isinstance(sample_num, int):
            continue  # full ranking or labelled data: no sampled negatives
        mode = config["eval_args"]["mode"][phase]
        if topk > sample_num + 1:
            raise DatasetError(
                f"Dataset '{name}': topk={config['topk']} with eval_args mode {phase}: {mode} ranks {sample_num + 1} "
                f"candidates, fewer than the top {topk} asked for. Lower topk to at most {sample_num + 1}, or "
                f"sample more negatives."
            )
        short = unseen < sample_num
        if short.any():
            raise DatasetError(
                f"Dataset '{name}': eval_args mode {phase}: {mode} needs {sample_num} items each user never "
                f"interacted with, but {int(short.sum())} of {len(users)} users in {inter_file} have fewer "
                f"(items left: {_examples(dataset, users[short], unseen[short])}; {num_items} items in all). "
                f"Lower the mode to {mode[:3]}{int(unseen.min())} or less, or rank all items with mode: full."
            )
    num_candidates = config["num_candidates"] if "num_candidates" in config else None
    if num_candidates is None:
        return
    # A training prompt excludes the target and, optionally, the max_history most recent items.
    max_history = config["max_history"] if config["exclude_history_from_negatives"] else 0
    excluded = np.minimum((num_items - unseen), max_history + 1) if max_history else np.ones_like(unseen)
    left = num_items - excluded
    short = left < num_candidates - 1
    if short.any():
        history = f" and the max_history={max_history} most recent items" if max_history else ""
        raise DatasetError(
            f"Dataset '{name}': num_candidates={num_candidates} needs {num_candidates - 1} negatives per training "
            f"prompt besides the target{history}, but {int(short.sum())} of {len(users)} users in {inter_file} "
            f"leave fewer of the {num_items} items (negatives left: "
            f"{_examples(dataset, users[short], left[short])}). "
            f"Lower num_candidates to at most {int(left.min()) + 1}."
        )
