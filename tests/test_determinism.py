"""deterministic_algorithms: torch's deterministic kernels for one run, the previous state restored after it."""

import os

import pytest
import torch
import torch._inductor.config as inductor_config

from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.utils import deterministic_algorithms


def global_state():
    return (torch.are_deterministic_algorithms_enabled(), inductor_config.deterministic,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_deterministic_algorithms_apply_inside_the_block_and_are_restored_after_a_failure(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = global_state()
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_algorithms(True):
            assert global_state() == (True, True, ":4096:8")
            raise RuntimeError("inside")
    assert global_state() == before
    with deterministic_algorithms(False):
        assert global_state() == before


def test_a_value_of_cublas_workspace_config_already_set_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_algorithms(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_run_with_deterministic_algorithms_gives_the_metrics_of_the_run_without(tiny_setup, tmp_path, monkeypatch):
    """On a CPU every kernel the run uses has a deterministic version (none raises), and the metrics are the same."""
    import recbole_ilora.quick_start as quick_start

    during, train_and_test = [], quick_start._train_and_test

    def recording(config, saved):
        during.append(torch.are_deterministic_algorithms_enabled())
        return train_and_test(config, saved)

    monkeypatch.setattr(quick_start, "_train_and_test", recording)
    before = global_state()
    results = [run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict={
        **tiny_setup[0], "limit_train_batches": 2, "checkpoint_dir": str(tmp_path / str(flag)),
        "deterministic_algorithms": flag}) for flag in (False, True)]
    assert results[0]["best_valid_result"] == results[1]["best_valid_result"]
    assert results[0]["test_result"] == results[1]["test_result"]
    assert during == [False, True] and global_state() == before
