"""Exact resume from the command line: a run killed (SIGKILL) or interrupted (SIGINT) mid-epoch and resumed
with ``--resume=...`` ends exactly as the uninterrupted run: the same best weights, bit for bit, and
the same validation and test metrics (printed with 12 decimals).

Each run is ``python run_recbole_ilora.py --model=iLoRA ...`` in its own folder, on the tiny random Llama
and 20 users of ml-100k, 2 epochs of 6 micro-batches (3 optimiser steps, 2 micro-batches accumulated),
with dropout and the curriculum on, so that every random generator matters, and a resume checkpoint
after every optimiser step.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from recbole.data import create_dataset, data_preparation

from recbole_ilora.config import Config, ConfigError
from recbole_ilora.pipeline import pretrain_gate_encoder
from recbole_ilora.model.ilora import iLoRA
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.trainer import TrainingInterrupted, iLoRATrainer
from tests.helpers import SLICE_SETTINGS, TINY_LLM, write_ml100k_slice

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    **SLICE_SETTINGS, **TINY_LLM,
    "epochs": 2, "train_batch_size": 8, "gradient_accumulation_steps": 2, "limit_train_batches": 6,
    "checkpoint_every_steps": 1, "metric_decimal_place": 12, "state": "INFO",
    # Every validation ties (all 20 candidates are in the top 20), which RecBole counts as an improvement:
    # the best model is the last one, so the runs are compared on their final weights.
    "topk": [1, 5, 10, 20], "valid_metric": "hit@20",
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def settings_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    settings = {**SETTINGS, "data_path": str(write_ml100k_slice(folder / "data", num_users=20))}
    # One gate encoder for every run (pretraining it inside a run would shift that run's random state).
    config = Config(model="iLoRA", dataset="ml-100k-slice",
                    config_dict={**settings, "checkpoint_dir": str(folder / "gate"), "state": "WARNING"})
    settings["gate_checkpoint"] = str(pretrain_gate_encoder(config))
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def command(settings_file: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_recbole_ilora.py"), "--model=iLoRA", "--dataset=ml-100k-slice",
            f"--config_files={settings_file}", f"--checkpoint_dir={run_dir / 'saved'}", *extra]


def start(cmd: list[str], run_dir: Path, name: str = "first") -> subprocess.Popen:
    """Start a run in ``run_dir``; its console output goes to ``<name>.log`` there (read by :func:`console`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(run_dir / f"{name}.log", "wb")  # a file, not a pipe nobody reads while the run goes on
    try:
        return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def console(run_dir: Path, name: str = "first") -> str:
    return ANSI.sub("", (run_dir / f"{name}.log").read_text())


def finished(proc: subprocess.Popen, run_dir: Path, name: str = "first") -> dict:
    """Wait for a run that should end normally; return its console, logged results and best weights."""
    assert proc.wait(timeout=300) == 0, console(run_dir, name)[-3000:]
    text = console(run_dir, name)
    results = {key: re.findall(rf"{key}\s*: (.*)", text)[-1] for key in ("best valid", "test result")}
    (best,) = (run_dir / "saved").glob("iLoRA-*.pth")
    assert not list((run_dir / "saved").glob("*.resume"))  # removed once training has finished
    return {**results, "console": text, "weights": torch.load(best, weights_only=False)["state_dict"]}


def wait_for_resume_checkpoint(proc: subprocess.Popen, run_dir: Path, epoch: int) -> dict:
    """Poll until the run has written a resume checkpoint inside ``epoch`` (not at its end); the run is
    frozen (SIGSTOP) while the file is read, so it cannot move on meanwhile. Returns that checkpoint,
    the run still frozen."""
    deadline, seen = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before a mid-epoch resume checkpoint:\n" + console(run_dir)[-3000:]
        files = list((run_dir / "saved").glob("*.pth.resume"))
        if files and files[0].stat().st_mtime_ns != seen:
            proc.send_signal(signal.SIGSTOP)
            seen = files[0].stat().st_mtime_ns
            state = torch.load(files[0], weights_only=False)
            if state["epoch"] == epoch and 0 < state["position"] < state["batches_per_epoch"]:
                return {**state, "path": files[0]}
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("no mid-epoch resume checkpoint within 300 s")


def assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["test result"] == uninterrupted["test result"]
    assert resumed["best valid"] == uninterrupted["best valid"]
    assert resumed["weights"].keys() == uninterrupted["weights"].keys()
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


@pytest.fixture(scope="module")
def uninterrupted(settings_file, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return finished(start(command(settings_file, run_dir), run_dir), run_dir)


def test_killed_mid_epoch_then_resumed_equals_uninterrupted(settings_file, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(command(settings_file, run_dir), run_dir)
    state = wait_for_resume_checkpoint(proc, run_dir, epoch=1)  # after epoch 0's validation and best model
    proc.kill()  # SIGKILL: no handler, no last checkpoint
    proc.wait()
    assert state["best_valid_result"] is not None and state["global_step"] == 3 + state["position"] // 2

    resumed = start(command(settings_file, run_dir, f"--resume={state['path']}"), run_dir, "resumed")
    result = finished(resumed, run_dir, "resumed")
    # It went on from the checkpoint (a run started over would end the same way too).
    assert f"Resuming {state['path']} at epoch 1, batch {state['position']} of 6" in result["console"]
    assert "epoch 0 training" not in result["console"] and "epoch 1 training" in result["console"]
    assert_same_run(result, uninterrupted)


def test_first_sigint_stops_cleanly_with_the_resume_command(settings_file, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(command(settings_file, run_dir), run_dir)
    wait_for_resume_checkpoint(proc, run_dir, epoch=0)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 130  # the shell's status for an interrupt
    text = console(run_dir)
    assert "test result" not in text and "Traceback" not in text
    resume_line = text.split("Continue it exactly with:\n", 1)[1].splitlines()[0]
    resume_cmd = shlex.split(resume_line)
    (resume_file,) = (run_dir / "saved").glob("*.pth.resume")
    assert resume_cmd[-1] == f"--resume={resume_file}"
    state = torch.load(resume_file, weights_only=False)
    assert state["epoch"] == 0 and 0 < state["position"] < 6 and state["best_valid_result"] is None

    result = finished(start(resume_cmd, run_dir, "resumed"), run_dir, "resumed")  # the logged command, as it is
    assert f"Resuming {resume_file} at epoch 0, batch {state['position']} of 6" in result["console"]
    assert_same_run(result, uninterrupted)


# ----------------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def trainer(settings_file, tmp_path_factory):
    settings = yaml.safe_load(settings_file.read_text())
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict={
        **settings, "state": "WARNING", "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))})
    train, _, _ = data_preparation(config, create_dataset(config))
    return iLoRATrainer(config, iLoRA(config, train._dataset))


def test_resume_refuses_what_it_cannot_continue_exactly(trainer, ml100k_slice, tmp_path):
    trainer._save_checkpoint(0, verbose=False, saved_model_file=str(tmp_path / "best.pth"))
    with pytest.raises(ConfigError, match="best-model checkpoint"):  # ConfigError: one line on the command line
        trainer.resume_checkpoint(tmp_path / "best.pth")
    with pytest.raises(ConfigError, match="no such file"):
        trainer.resume_checkpoint(tmp_path / "missing.pth.resume")
    with pytest.raises(ConfigError, match="RecBole baseline"):
        run_recbole_ilora("SASRec", "ml-100k-slice", config_dict={
            **ml100k_slice, "checkpoint_dir": str(tmp_path), "resume": str(tmp_path / "best.pth")})


# A short in-process run with learning_curve on: 2 epochs of 2 optimiser steps, resume checkpoints at epoch ends.
CURVE = {"learning_curve": True, "limit_train_batches": 2, "gradient_accumulation_steps": 1,
         "checkpoint_every_steps": 0, "state": "WARNING"}


def curve_settings(settings_file: Path, checkpoint_dir: Path) -> dict:
    return {**yaml.safe_load(settings_file.read_text()), **CURVE, "checkpoint_dir": str(checkpoint_dir),
            "output_root": str(checkpoint_dir)}


@pytest.fixture(scope="module")
def interrupted_run(settings_file, tmp_path_factory):
    """The run above stopped by a Ctrl-C as its second epoch begins: its settings and its resume file."""
    settings = curve_settings(settings_file, tmp_path_factory.mktemp("interrupted"))
    train_epoch = iLoRATrainer._train_epoch

    def interrupt_second_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 1:
            signal.raise_signal(signal.SIGINT)  # the trainer's handler: stop at the next step boundary
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(iLoRATrainer, "_train_epoch", interrupt_second_epoch)
        with pytest.raises(TrainingInterrupted) as stopped:
            run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=settings)
    return settings, Path(stopped.value.resume_file)


def test_resume_refuses_changed_result_settings_naming_each_with_both_values(interrupted_run):
    settings, resume_file = interrupted_run
    before = Config(model="iLoRA", dataset="ml-100k-slice", config_dict=settings)
    changed = {"learning_rate": before["learning_rate"] * 2, "num_candidates": before["num_candidates"] - 5}
    with pytest.raises(ConfigError) as refused:
        run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict={
            **settings, **changed, "resume": str(resume_file), "show_progress": True})  # display: no matter
    message = str(refused.value)
    assert "\n" not in message
    for key, value in changed.items():
        assert f"{key}={before[key]!r} (now {value!r})" in message
    assert "show_progress" not in message and "resume=" in message
    assert resume_file.is_file()  # refused before anything was trained or written


def test_a_resumed_run_keeps_the_learning_curve_points_of_before_the_interruption(
        settings_file, interrupted_run, tmp_path):
    settings, resume_file = interrupted_run
    copy = tmp_path / "interrupted"
    shutil.copytree(resume_file.parent, copy)  # the resumed run removes its resume file at the end
    resumed = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict={
        **settings, "checkpoint_dir": str(copy), "resume": str(copy / resume_file.name)})
    whole = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=curve_settings(settings_file, tmp_path / "whole"))
    assert [point["epoch"] for point in whole["learning_curve"]] == [1, 2]
    assert resumed["learning_curve"] == whole["learning_curve"]


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_resume_from_a_file_that_is_no_resume_checkpoint_is_one_line(trainer, tmp_path, content):
    path = tmp_path / "other.pth.resume"
    if content is None:
        torch.save({"some": "dict"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        trainer.resume_checkpoint(path)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"resume={path}")
