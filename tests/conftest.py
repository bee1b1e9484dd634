"""Shared fixtures: a small slice of RecBole's bundled ml-100k, written as atomic files.

A full ml-100k epoch of SASRec takes minutes on 2 CPU cores; the slice keeps the same files, fields
and protocol with a few users so end-to-end runs take seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora.config import Config
from recbole_ilora.outputs import OUTPUT_ROOT_ENV
from tests.helpers import SLICE_NAME, SLICE_SETTINGS, TINY_LLM, write_ml100k_slice


@pytest.fixture(scope="session")
def ml100k_slice(tmp_path_factory) -> dict:
    """Config overrides that point RecBole at the slice (dataset name: ``ml-100k-slice``)."""
    root = write_ml100k_slice(tmp_path_factory.mktemp("data"))
    return {"data_path": str(root), **SLICE_SETTINGS}


@pytest.fixture()
def run_dirs(tmp_path) -> dict:
    """Keep checkpoints and logs of a test run inside its tmp folder."""
    return {"checkpoint_dir": str(tmp_path / "saved")}


@pytest.fixture(scope="session")
def tiny_setup(ml100k_slice, tmp_path_factory):
    """iLoRA settings on the tiny LLM, its config and the slice's dataloaders (train, valid, test).

    The gate encoder is pretrained once here (cached in the session's checkpoint folder) and reused.
    """
    overrides = {**ml100k_slice, **TINY_LLM, "epochs": 1, "lora_dropout": 0.0,
                 "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}
    config = Config(model="iLoRA", dataset=SLICE_NAME, config_dict=overrides)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    return overrides, config, train, valid, test


# ------------------------------------------------------------------------- nothing outside tmp folders
REPO = Path(__file__).resolve().parent.parent
OUTPUT_FOLDERS = ("outputs", "log", "log_tensorboard", "saved")  # RecBole's and the plugin's output folders


def files_in_output_folders() -> set:
    """Files and folders (RecBole's Trainer creates an empty ``saved/`` for a relative checkpoint_dir)."""
    return {str(path) for name in OUTPUT_FOLDERS for path in (REPO / name, *(REPO / name).rglob("*")) if path.exists()}


@pytest.fixture(scope="session", autouse=True)
def outputs_in_tmp(tmp_path_factory):
    """Every run of the suite (subprocesses included, through the environment) writes under a tmp folder; at the
    end of the session, any file or folder that appeared in the repository's output folders fails it."""
    before = files_in_output_folders()
    os.environ[OUTPUT_ROOT_ENV] = str(tmp_path_factory.mktemp("outputs"))
    yield
    del os.environ[OUTPUT_ROOT_ENV]
    written = sorted(files_in_output_folders() - before)
    assert not written, f"tests wrote outside their tmp folders: {written[:5]}"


@pytest.fixture(autouse=True)
def ctrl_c_handler_restored(request):
    """Every test leaves the process's SIGINT handler as it found it (the Ctrl-C tests rely on Python's own)."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"{request.node.nodeid} left SIGINT handled by {after!r} (was {before!r})")
