"""Helpers shared by the test modules: a slice of ml-100k as atomic files, the tiny LLM settings, small utilities."""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd
import torch

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

# Settings that point RecBole at a slice written by write_ml100k_slice (dataset name: ``ml-100k-slice``).
# Tests run on the CPU on a GPU machine too: their equivalences hold to fp32 precision and are
# deterministic there; GPU speed is measured by benchmarks/throughput.py.
SLICE_SETTINGS = {
    "gpu_id": "",
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


def make_tiny_model(setup, model_name="iLoRA", **changes):
    """A plugin model on the tiny LLM from the ``tiny_setup`` fixture's settings, seeded as quick_start does."""
    from recbole.utils import init_seed

    from recbole_ilora.config import Config

    from recbole_ilora.pipeline import build_model

    overrides, _, train, _, _ = setup
    config = Config(model=model_name, dataset=SLICE_NAME, config_dict={**overrides, **changes})
    init_seed(config["seed"], True)
    return build_model(config, train._dataset), config


def first_batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def first_training_batch(model, loader):
    """The loader's first batch with what a training step draws for it: its candidates (the target and random
    negatives) and template 0 for every prompt."""
    from recbole_ilora.sampling import training_candidates

    interaction = first_batch(loader)
    history, present = model.recent_history(interaction)
    candidates = training_candidates(interaction["item_id"], history, model.n_items, model.num_candidates)
    return interaction, candidates, torch.zeros(len(interaction), dtype=torch.long)


def randomize_lora_b(model, seed=0):
    """peft starts B at zero (LoRA is then a no-op and A gets no gradient): give it values so tests bite."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return str(sock.getsockname()[1])
