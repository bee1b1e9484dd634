"""Tests write only under their tmp folders: the default output_root and the TensorBoard fallback follow
$RECBOLE_ILORA_OUTPUT_ROOT (set for the whole session by conftest, which also checks the repository at the end)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from recbole_ilora import compat
from recbole_ilora.outputs import OUTPUT_ROOT_ENV
from recbole_ilora.quick_start import run_recbole_ilora


def test_a_run_without_output_settings_writes_under_the_session_root(ml100k_slice, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_recbole_ilora("Pop", "ml-100k-slice", config_dict={**ml100k_slice, "epochs": 1})
    root = Path(os.environ[OUTPUT_ROOT_ENV])
    assert Path(result["log_file"]).is_relative_to(root)
    assert any((root / "saved").glob("Pop-*.pth"))
    assert not list(tmp_path.iterdir())  # nothing in the working directory


def test_a_trainer_without_a_log_file_keeps_its_events_under_output_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer = compat._tensorboard_beside_log(logging.getLogger("no-file-handler"))
    writer.close()
    assert Path(writer.log_dir).is_relative_to(os.environ[OUTPUT_ROOT_ENV])
    assert not (tmp_path / "log_tensorboard").exists()
