"""Shared fixtures: a small slice of RecBole's bundled ml-100k, written as atomic files.

A full ml-100k epoch of SASRec takes minutes on 2 CPU cores; the slice keeps the same files, fields
and protocol with a few users so end-to-end runs take seconds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import recbole_ilora  # noqa: F401 - compatibility fixes before any RecBole import below

ML100K_DIR = Path(__import__("recbole").__file__).parent / "dataset_example" / "ml-100k"
SLICE_NAME = "ml-100k-slice"

# The plugin LLM models on a tiny random Llama with a tiny gate encoder: fast enough for CPU tests.
TINY_LLM = {
    "llm_path": "tiny-random-llama",
    "gate_sasrec": {"epochs": 1, "hidden_size": 16, "inner_size": 32},
    "train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "eval_batch_size": 160,
}


def write_ml100k_slice(root: Path, num_users: int = 40, max_items_per_user: int = 30) -> Path:
    """Write the first ``num_users`` users (by id) of ml-100k, each with their last interactions."""
    inter = pd.read_csv(ML100K_DIR / "ml-100k.inter", sep="\t", dtype=str)
    inter["ts"] = inter["timestamp:float"].astype(float)
    users = sorted(inter["user_id:token"].unique(), key=int)[:num_users]
    inter = inter[inter["user_id:token"].isin(users)].sort_values(["user_id:token", "ts"])
    inter = inter.groupby("user_id:token").tail(max_items_per_user).drop(columns="ts")
    item = pd.read_csv(ML100K_DIR / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    item = item[item["item_id:token"].isin(inter["item_id:token"].unique())]
    folder = root / SLICE_NAME
    folder.mkdir(parents=True, exist_ok=True)
    inter.to_csv(folder / f"{SLICE_NAME}.inter", sep="\t", index=False)
    item.to_csv(folder / f"{SLICE_NAME}.item", sep="\t", index=False)
    return root


@pytest.fixture(scope="session")
def ml100k_slice(tmp_path_factory) -> dict:
    """Config overrides that point RecBole at the slice (dataset name: ``ml-100k-slice``)."""
    root = write_ml100k_slice(tmp_path_factory.mktemp("data"))
    return {
        "data_path": str(root),
        "load_col": {
            "inter": ["user_id", "item_id", "rating", "timestamp"],
            "item": ["item_id", "movie_title", "release_year"],
        },
        "item_text_field": "movie_title",
        "item_year_field": "release_year",
        "prompt_domain": "movie",
        "show_progress": False,
        "state": "WARNING",
    }


@pytest.fixture()
def run_dirs(tmp_path) -> dict:
    """Keep checkpoints and logs of a test run inside its tmp folder."""
    return {"checkpoint_dir": str(tmp_path / "saved")}
