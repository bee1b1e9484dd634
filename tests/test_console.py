"""What the console shows: no colour codes when redirected, the users RecBole has (not its padding id), no time
estimate from the first batches, the gate encoder's epochs in the log file only."""

from __future__ import annotations

import io
import logging

from recbole_ilora.config import Config
from recbole_ilora.outputs import init_logger
from recbole_ilora.pipeline import pretrain_gate_encoder
from recbole_ilora.progress import WARMUP_STEPS, WarmProgress
from recbole_ilora.quick_start import _remove_run_handlers, run_recbole_ilora
from tests.helpers import SLICE_NAME, TINY_LLM


def test_redirected_console_has_no_colour_codes_and_counts_real_users(ml100k_slice, run_dirs, capsys):
    result = run_recbole_ilora("Pop", SLICE_NAME, config_dict={**ml100k_slice, **run_dirs, "epochs": 1, "state": "INFO"})
    console = capsys.readouterr().err  # captured: not a terminal
    assert "\x1b[" not in console and "Protocol:" in console
    users = len(result["test_per_user"]["hit@1"])
    assert f"Dataset {SLICE_NAME}: {users} users," in console  # the 40 users tested, not 41
    assert f"The number of users: {users + 1}" not in console
    with open(result["log_file"]) as log:
        assert f"The number of users: {users + 1}" in log.read()  # RecBole's own printout: the log file


def test_no_time_estimate_before_warm_up():
    bar = WarmProgress(range(10), total=10, file=io.StringIO(), mininterval=0)
    shown = []
    for _ in bar:
        shown.append(str(bar))
    assert all("<?" in text for text in shown[:WARMUP_STEPS])
    assert "<?" not in shown[WARMUP_STEPS] and "it/s" in shown[WARMUP_STEPS]


def test_gate_encoder_epochs_go_to_the_log_file_only(ml100k_slice, tmp_path, capsys):
    config = Config(model="iLoRA", dataset=SLICE_NAME, config_dict={
        **ml100k_slice, **TINY_LLM, "checkpoint_dir": str(tmp_path / "saved"), "output_root": str(tmp_path),
        "state": "INFO", "gate_sasrec": {"epochs": 2, "hidden_size": 16, "inner_size": 32}})
    handlers = set(logging.getLogger().handlers)
    log_file = init_logger(config)
    try:
        pretrain_gate_encoder(config)
    finally:
        _remove_run_handlers(handlers)
    console, log = capsys.readouterr().err, log_file.read_text()
    assert "Gate encoder pretrained: best validation NDCG@5" in console
    assert "epoch 1 training" not in console and "valid result" not in console and "[Training]" not in console
    assert "epoch 1 training" in log and "valid result" in log


def test_no_weight_loading_bars_when_redirected(tmp_path, capsys):
    import torch

    from recbole_ilora.llm import build_tiny_llama, load_llm

    model, tokenizer = build_tiny_llama(["a tiny corpus"])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()
    load_llm(str(tmp_path), torch.float32)
    assert "Loading weights" not in capsys.readouterr().err
