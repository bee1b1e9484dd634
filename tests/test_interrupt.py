"""Ctrl-C: one two-stage handler for the trainer and the launcher; a RecBole baseline interrupted ends in one line."""

from __future__ import annotations

import logging
import signal

import pytest
import recbole.trainer
import yaml

from recbole_ilora.cli import main
from recbole_ilora import launch
from recbole_ilora.interrupt import two_stage_interrupt
from tests.helpers import SLICE_NAME, SLICE_SETTINGS


def test_two_stage_handler_first_asks_second_stops_at_once_then_restores():
    before, asked = signal.getsignal(signal.SIGINT), []
    with two_stage_interrupt(lambda: asked.append(True)):
        signal.raise_signal(signal.SIGINT)
        assert asked == [True]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert asked == [True] and signal.getsignal(signal.SIGINT) is before


def test_the_launcher_waits_on_the_first_interrupt_and_stops_on_the_second(caplog):
    with launch.workers_handle_first_interrupt():
        with caplog.at_level(logging.WARNING):
            signal.raise_signal(signal.SIGINT)  # the workers stop at their next step: nothing raised here
        assert "waiting for the workers" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_on_a_recbole_baseline_ends_in_one_line_with_status_130(ml100k_slice, tmp_path, monkeypatch, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({**SLICE_SETTINGS, "data_path": ml100k_slice["data_path"], "epochs": 2,
                                        "output_root": str(tmp_path), "state": "INFO", "show_progress": False}))

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt  # what Python's own SIGINT handler raises on a terminal's Ctrl-C (RecBole has none)

    monkeypatch.setattr(recbole.trainer.Trainer, "_train_epoch", ctrl_c)
    with pytest.raises(SystemExit) as stopped:
        main(["--model=SASRec", f"--dataset={SLICE_NAME}", f"--config_files={settings}"])
    assert stopped.value.code == 130
    output = capsys.readouterr()
    console = output.out + output.err
    assert "Traceback" not in console
    (line,) = [line for line in console.splitlines() if "Interrupt" in line]
    assert "SASRec" in line and "stopped at once, without a resume checkpoint." in line
