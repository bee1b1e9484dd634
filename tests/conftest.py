"""Shared fixtures: a small slice of RecBole's bundled ml-100k, written as atomic files.

A full ml-100k epoch of SASRec takes minutes on 2 CPU cores; the slice keeps the same files, fields
and protocol with a few users so end-to-end runs take seconds.
"""

from __future__ import annotations

import pytest

from tests.helpers import SLICE_SETTINGS, write_ml100k_slice


@pytest.fixture(scope="session")
def ml100k_slice(tmp_path_factory) -> dict:
    """Config overrides that point RecBole at the slice (dataset name: ``ml-100k-slice``)."""
    root = write_ml100k_slice(tmp_path_factory.mktemp("data"))
    return {"data_path": str(root), **SLICE_SETTINGS}


@pytest.fixture()
def run_dirs(tmp_path) -> dict:
    """Keep checkpoints and logs of a test run inside its tmp folder."""
    return {"checkpoint_dir": str(tmp_path / "saved")}
