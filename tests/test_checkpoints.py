"""``--eval_checkpoint``: a checkpoint is evaluated under the settings it was trained with (adopted, or one line
when the command contradicts them), with its own gate encoder; wrong files get one line; pretraining a gate
encoder shows no temporary file names and leaves none behind when interrupted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import recbole.trainer

from recbole_ilora import pipeline
from recbole_ilora.checkpoints import CheckpointError
from recbole_ilora.cli import main
from recbole_ilora.config import Config
from recbole_ilora.quick_start import run_recbole_ilora
from tests.helpers import SLICE_NAME, SLICE_SETTINGS, TINY_LLM, write_ml100k_slice

TRAINED = {"lora_rank": 4, "num_experts": 2}  # not the defaults: an evaluation must adopt them


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short iLoRA run with non-default adapter settings on 12 users: the command's settings, its result, its
    checkpoint."""
    data = write_ml100k_slice(tmp_path_factory.mktemp("data"), num_users=12)
    base = {**SLICE_SETTINGS, **TINY_LLM, "data_path": str(data), "epochs": 1, "limit_train_batches": 1,
            "checkpoint_dir": str(tmp_path_factory.mktemp("saved")), "output_root": str(data)}
    result = run_recbole_ilora("iLoRA", SLICE_NAME, config_dict={**base, **TRAINED})
    (checkpoint,) = Path(base["checkpoint_dir"]).glob("iLoRA-*.pth")
    return base, result, checkpoint


def no_pretraining(*args, **kwargs):
    raise AssertionError("a gate encoder was pretrained anew")


def test_eval_checkpoint_adopts_the_trained_settings_and_gate_encoder(trained, monkeypatch):
    base, result, checkpoint = trained
    monkeypatch.setattr(pipeline, "_pretrain", no_pretraining)
    topk = [1, 5]  # an evaluation setting, and part of the gate encoder's cache key
    evaluated = run_recbole_ilora("iLoRA", SLICE_NAME, config_dict={
        **base, "eval_checkpoint": str(checkpoint), "topk": topk})
    assert evaluated["test_result"]
    for metric, value in evaluated["test_result"].items():
        assert value == result["test_result"][metric], metric


def test_eval_checkpoint_refuses_settings_that_contradict_the_checkpoint_in_one_line(trained):
    base, _, checkpoint = trained
    command = {**base, "eval_checkpoint": str(checkpoint), "lora_rank": 8, "num_experts": 4}
    with pytest.raises(CheckpointError) as refused:
        run_recbole_ilora("iLoRA", SLICE_NAME, config_dict=command)
    message = str(refused.value)
    assert "\n" not in message
    for key, value in TRAINED.items():
        assert f"{key}={value!r} (now {command[key]!r})" in message


def test_eval_checkpoint_of_a_missing_file_or_another_model_is_one_line_exit_2(trained, tmp_path, capsys):
    base, _, checkpoint = trained
    (sasrec,) = (checkpoint.parent / "gate_encoders").glob("SASRec-*.pth")  # a RecBole SASRec checkpoint
    settings = [f"--data_path={base['data_path']}", f"--checkpoint_dir={tmp_path}", "--llm_path=tiny-random-llama"]
    for path, expected in ((tmp_path / "missing.pth", "does not exist"), (sasrec, "holds a SASRec model")):
        with pytest.raises(SystemExit) as stopped:
            main(["--model=iLoRA", f"--dataset={SLICE_NAME}", f"--eval_checkpoint={path}", *settings])
        assert stopped.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert expected in line and str(path) in line


def test_gate_pretraining_shows_no_temporary_names_and_leaves_none_when_interrupted(
        ml100k_slice, tmp_path, monkeypatch, caplog):
    config = Config(model="iLoRA", dataset=SLICE_NAME, config_dict={
        **ml100k_slice, **TINY_LLM, "gate_sasrec": {**TINY_LLM["gate_sasrec"], "epochs": 2},
        "checkpoint_dir": str(tmp_path)})
    train_epoch = recbole.trainer.Trainer._train_epoch

    def interrupted_second_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 1:  # after the first epoch's checkpoint was written
            raise KeyboardInterrupt
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(recbole.trainer.Trainer, "_train_epoch", interrupted_second_epoch)
    caplog.set_level(logging.INFO)
    with pytest.raises(KeyboardInterrupt):
        pipeline.pretrain_gate_encoder(config)
    assert "Pretraining the gate encoder" in caplog.text  # the log was captured
    assert ".partial" not in caplog.text
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # nothing half-written left behind
