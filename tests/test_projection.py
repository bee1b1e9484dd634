"""CPU projection: an LLM run too slow or too large for this CPU stops before any work, in one line."""

from __future__ import annotations

import json

import pytest

from recbole_ilora import projection, quick_start
from recbole_ilora.cli import main as cli_main
from recbole_ilora.config import Config
from recbole_ilora.projection import CPURunTooLarge, project, recheck_after_first_step
from tests.helpers import SLICE_NAME

SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152}
CPU_SPEED = 150e9  # fp32 matmul FLOP/s of the 2-core machine the issue was seen on


class Built(Exception):
    """Raised instead of building the model: the run got past the projection."""


@pytest.fixture()
def llm_folder(tmp_path):
    """A folder with SmolLM2-135M's config.json: its shape is known, nothing is loaded."""
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    return folder


def test_the_readme_runs_are_projected_as_they_were_measured():
    """ml-100k without a preset was killed at 24 GB in batch 3 and would run for days; the cpu-demo takes
    about 5 minutes and 9 GB."""
    full = Config(model="iLoRA", dataset="ml-100k", config_dict={"llm_path": "smollm2-135m"})
    big = project(full, train_batches=6206, n_users=943, n_items=1682, title_chars=25, shape=projection.llm_shape(
        "smollm2-135m"), flops_per_second=CPU_SPEED)
    assert big.hours > 24 and 18 < big.peak_bytes / 2**30 < 32
    demo = Config(model="iLoRA", dataset="ml-100k", config_file_list=["properties/cpu-demo.yaml"])
    small = project(demo, train_batches=24, n_users=54, n_items=1682, title_chars=25,
                    shape=projection.llm_shape("smollm2-135m"), flops_per_second=CPU_SPEED)
    assert small.hours < 0.5 and small.peak_bytes / 2**30 < 10


def test_shape_from_a_model_folder(llm_folder):
    shape = projection.llm_shape(str(llm_folder))
    assert shape["layers"] == 30 and 120e6 < shape["parameters"] < 140e6  # 134.5M (tied embeddings)
    assert projection.llm_shape("someone/some-model") is None  # a hub id: unknown before loading


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    return exit_info.value.code, capsys.readouterr().err


def cli_args(ml100k_slice, tmp_path, llm_folder, *extra):
    settings = {**ml100k_slice, "output_root": str(tmp_path / "outputs"), "llm_path": str(llm_folder)}
    return [f"--model=iLoRA", f"--dataset={SLICE_NAME}", *(f"--{k}={v!r}" for k, v in settings.items()), *extra]


def test_a_slow_cpu_run_stops_before_any_work_with_one_line(ml100k_slice, tmp_path, llm_folder, capsys, monkeypatch):
    monkeypatch.setattr(projection, "matmul_flops_per_second", lambda: 1e9)  # a slow machine
    monkeypatch.setattr(quick_start, "build_model", lambda *a: (_ for _ in ()).throw(Built()))
    code, error = run_cli(cli_args(ml100k_slice, tmp_path, llm_folder), capsys)
    assert code == 2 and error.count("\n") == 1 and error.startswith("run_recbole_ilora.py: error:"), error
    assert "projected about" in error and "h (training" in error
    assert "--config_files=properties/cpu-demo.yaml" in error and "allow_slow_cpu_run: True" in error
    assert not (tmp_path / "outputs" / "saved" / "gate_encoders").exists()  # no gate encoder pretrained

    with pytest.raises(Built):  # allowed: the run goes on to build the model
        cli_main(cli_args(ml100k_slice, tmp_path, llm_folder, "--allow_slow_cpu_run=True"))


def test_a_run_over_the_memory_stops_too(ml100k_slice, tmp_path, llm_folder, capsys, monkeypatch):
    monkeypatch.setattr(projection, "matmul_flops_per_second", lambda: 1e15)  # fast enough
    monkeypatch.setattr(projection, "available_memory_bytes", lambda: 2 * 2**30)
    monkeypatch.setattr(quick_start, "build_model", lambda *a: (_ for _ in ()).throw(Built()))
    code, error = run_cli(cli_args(ml100k_slice, tmp_path, llm_folder), capsys)
    assert code == 2 and "more than the 2.0 GB available" in error and "allow_slow_cpu_run" in error


def test_a_small_run_passes(ml100k_slice, tmp_path, llm_folder, monkeypatch):
    monkeypatch.setattr(projection, "matmul_flops_per_second", lambda: 1e15)
    monkeypatch.setattr(projection, "available_memory_bytes", lambda: 1e12)
    monkeypatch.setattr(quick_start, "build_model", lambda *a: (_ for _ in ()).throw(Built()))
    with pytest.raises(Built):
        cli_main(cli_args(ml100k_slice, tmp_path, llm_folder))


def test_the_measured_step_rechecks_the_projection():
    config = Config(model="iLoRA", dataset="ml-100k", config_file_list=["properties/cpu-demo.yaml"],
                    config_dict={"gpu_id": ""})  # a CPU run, on a GPU machine too
    planned = project(config, train_batches=24, n_users=54, n_items=1682, title_chars=25,
                      shape=projection.llm_shape("smollm2-135m"), flops_per_second=CPU_SPEED)
    recheck_after_first_step(1.0, planned, config)  # as projected: passes
    with pytest.raises(CPURunTooLarge, match=r"a measured training step of 400.0 s makes the run about .* h"):
        recheck_after_first_step(400.0, planned, config)
    config["allow_slow_cpu_run"] = True
    recheck_after_first_step(400.0, planned, config)
