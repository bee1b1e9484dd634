"""Batch sizes given as auto: the CPU's fixed values, and the GPU's probe, with a simulated device memory."""

from __future__ import annotations

import json

import pytest
import torch

from recbole_ilora import quick_start
from recbole_ilora.batch_sizes import CACHE_FILE, fit_batch_sizes_to_device
from recbole_ilora.config import Config
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.settings import SettingError
from tests.helpers import SLICE_NAME, make_tiny_model

AUTO = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto", "eval_batch_size": "auto"}


class SimulatedMemory:
    """A device whose peak memory grows linearly with the rows of a call; the call itself runs, on the CPU."""

    name, total_gib = "simulated GPU", 10.0  # budget: 8 GiB

    def __init__(self, model, train_gib_per_row=0.2, eval_gib_per_row=0.012, out_of_memory_above=None):
        self.model = model
        self.train_gib_per_row, self.eval_gib_per_row = train_gib_per_row, eval_gib_per_row
        self.out_of_memory_above = out_of_memory_above
        self.calls = []

    def peak_gib(self, run, rows):
        run()
        training = self.model.training  # the probe's training step trains, its scoring evaluates
        self.calls.append(("train" if training else "eval", rows))
        if self.out_of_memory_above is not None and rows > self.out_of_memory_above:
            return None
        return rows * (self.train_gib_per_row if training else self.eval_gib_per_row)


def test_auto_on_a_cpu_is_the_authors_effective_batch_in_micro_batches_of_16(ml100k_slice):
    config = Config(model="iLoRA", dataset=SLICE_NAME, config_dict={**ml100k_slice, "llm_path": "tiny-random-llama"})
    assert (config["train_batch_size"], config["gradient_accumulation_steps"], config["eval_batch_size"]) == (16, 8, 320)
    assert config.auto_batch_sizes == ("train_batch_size", "gradient_accumulation_steps", "eval_batch_size")
    given = Config(model="iLoRA", dataset=SLICE_NAME, config_dict={**ml100k_slice, "train_batch_size": 32})
    assert (given["train_batch_size"], given["gradient_accumulation_steps"]) == (32, 4)  # accumulation derived
    both = Config(model="iLoRA", dataset=SLICE_NAME, config_dict={**ml100k_slice, "train_batch_size": 8,
                                                                   "gradient_accumulation_steps": 3})
    assert (both["train_batch_size"], both["gradient_accumulation_steps"]) == (8, 3)
    assert Config(model="SASRec", dataset=SLICE_NAME, config_dict=ml100k_slice).auto_batch_sizes == ()


def test_bad_batch_settings_are_refused_in_one_line(ml100k_slice):
    with pytest.raises(SettingError, match=r"train_batch_size='big' \(--train_batch_size\) must be a positive int or auto"):
        Config(model="iLoRA", dataset=SLICE_NAME, config_dict={**ml100k_slice, "train_batch_size": "big"})
    with pytest.raises(SettingError, match="effective_batch_size=100 .* not a multiple of 16"):
        Config(model="iLoRA", dataset=SLICE_NAME, config_dict={**ml100k_slice, "effective_batch_size": 100})


def _probe_setup(tiny_setup, tmp_path, **changes):
    overrides, _, train, _, test = tiny_setup
    model, config = make_tiny_model(tiny_setup, **AUTO, effective_batch_size=64, checkpoint_dir=str(tmp_path), **changes)
    return model, config, train, test


def test_the_probe_picks_the_largest_sizes_that_fit_and_changes_nothing(tiny_setup, tmp_path):
    model, config, train, test = _probe_setup(tiny_setup, tmp_path)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    rng, loader_rng = torch.get_rng_state(), train.generator.get_state()
    memory = SimulatedMemory(model)  # 64 rows: 12.8 GiB, over the 8 GiB budget; 32: 6.4 GiB
    assert fit_batch_sizes_to_device(config, model, train, test, config.auto_batch_sizes, memory=memory)
    assert memory.calls[:2] == [("train", 64), ("train", 32)]
    # eval: 40 users x 20 rows = 9.6 GiB, over; 32 users x 20 = 7.7 GiB fits
    assert (config["train_batch_size"], config["gradient_accumulation_steps"], config["eval_batch_size"]) == (32, 2, 640)
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters()) and model.training_progress == 0.0
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(loader_rng, train.generator.get_state())

    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert [entry["fitted"]["train_batch_size"] for entry in cached.values()] == [32]
    again, config_again, _, _ = _probe_setup(tiny_setup, tmp_path)
    unused = SimulatedMemory(again)
    fit_batch_sizes_to_device(config_again, again, train, test, config_again.auto_batch_sizes, memory=unused)
    assert unused.calls == []  # read from the cache, not probed again
    assert config_again["train_batch_size"] == 32 and config_again["eval_batch_size"] == 640


def test_the_listwise_loss_is_probed_apart_from_the_lm_loss(tiny_setup, tmp_path):
    """It holds every candidate's activations too: an LM-loss run's sizes are not reused for it (nor the other way)."""
    calls = {}
    for run, weight in (("lm", 0.0), ("listwise", 0.5), ("listwise again", 0.2), ("lm again", 0.0)):
        model, config, train, test = _probe_setup(tiny_setup, tmp_path, listwise_loss_weight=weight)
        memory = SimulatedMemory(model)
        fit_batch_sizes_to_device(config, model, train, test, config.auto_batch_sizes, memory=memory)
        calls[run] = memory.calls
    assert calls["lm"] and calls["listwise"]  # each probed
    assert calls["listwise again"] == calls["lm again"] == []  # the weight's value does not matter, only which losses
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_under_flex_attention_the_probe_scores_as_the_evaluation_does(tiny_setup, tmp_path, monkeypatch):
    """FlexAttention's eager fallback holds every score of a sequence, far more than its compiled kernel: under flex
    the probe's scoring keeps torch.compile's stance (its training step stays eager), and its sizes are cached
    apart from those of the dense mask."""
    stances, set_stance = [], torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **kwargs: stances.append(stance) or
                        set_stance(stance, **kwargs))
    probed = {}
    for attention in ("dense", "flex"):
        model, config, train, test = _probe_setup(tiny_setup, tmp_path, score_attention=attention)
        memory, stances[:] = SimulatedMemory(model), []
        fit_batch_sizes_to_device(config, model, train, test, config.auto_batch_sizes, memory=memory)
        probed[attention] = {(kind, stance) for (kind, _), stance in zip(memory.calls, stances, strict=True)}
    assert probed["dense"] == {("train", "force_eager"), ("eval", "force_eager")}
    assert probed["flex"] == {("train", "force_eager"), ("eval", "default")}
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_out_of_memory_moves_to_the_next_size_and_nothing_fitting_says_what_to_do(tiny_setup, tmp_path):
    model, config, train, test = _probe_setup(tiny_setup, tmp_path / "a")
    memory = SimulatedMemory(model, train_gib_per_row=0.01, out_of_memory_above=32)
    fit_batch_sizes_to_device(config, model, train, test, ("train_batch_size", "gradient_accumulation_steps"),
                              memory=memory)
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (32, 2)
    model, config, train, test = _probe_setup(tiny_setup, tmp_path / "b")
    with pytest.raises(SettingError, match="not even 16 prompts per micro-batch fit .* Give a smaller --train_batch_size"):
        fit_batch_sizes_to_device(config, model, train, test, ("train_batch_size",),
                                  memory=SimulatedMemory(model, out_of_memory_above=0))


def test_a_run_at_fitted_sizes_equals_the_run_given_those_sizes(tiny_setup, tmp_path, monkeypatch):
    """The loaders rebuilt at the fitted sizes train and evaluate exactly as loaders built at them."""
    overrides = {**tiny_setup[0], "effective_batch_size": 64, "limit_train_batches": 3,
                 "checkpoint_dir": str(tmp_path / "saved")}
    fit, probes = quick_start.fit_batch_sizes_to_device, []

    def fit_to_simulated_memory(config, model, *args):
        probes.append(SimulatedMemory(model))
        return fit(config, model, *args, memory=probes[-1])

    monkeypatch.setattr(quick_start, "fit_batch_sizes_to_device", fit_to_simulated_memory)
    fitted = run_recbole_ilora("iLoRA", SLICE_NAME, config_dict={**overrides, **AUTO})
    monkeypatch.undo()
    given = run_recbole_ilora("iLoRA", SLICE_NAME, config_dict={**overrides, "train_batch_size": 32,
                                                                "gradient_accumulation_steps": 2, "eval_batch_size": 640})
    assert probes[0].calls[:2] == [("train", 64), ("train", 32)]
    assert fitted["test_result"] == given["test_result"]
    assert fitted["best_valid_result"] == given["best_valid_result"]
