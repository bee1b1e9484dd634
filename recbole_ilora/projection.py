"""How long and how much memory an LLM run will take on a CPU, said before any work (and refused when too much).

:func:`check_cpu_run` runs in the quick start after the data are loaded and before the gate encoder is
pretrained or the LLM loaded: from the LLM's shape (read from its config, or the table below for the
offline aliases, nothing loaded), the batch sizes, the number of training batches and evaluated users,
and prompt lengths estimated from the titles, it projects the run's time (6 x parameters FLOPs per
trained token, 2 x per scored token, at the speed of this machine's matrix multiplications) and its peak
memory (the weights, and the activations autograd keeps for one training micro-batch). A run projected
over an hour, or over the memory available, stops with one line naming the CPU preset and the setting
that allows it anyway (``allow_slow_cpu_run``). :func:`recheck_after_first_step` repeats the time check
once the model exists, from one timed forward pass of a real training batch.

The projection is coarse (within a factor of about 2 on the machines measured): it is there to keep
a 2-core laptop from a run of days, or from the kernel's OOM killer, not to schedule jobs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import torch

from recbole_ilora.settings import ConfigError

MAX_CPU_HOURS = 1.0
CPU_PRESET = "--config_files=properties/cpu-demo.yaml"
_EFFICIENCY = 0.7  # share of the matmul speed a whole decoder step reaches (SmolLM2 on 2 cores: 0.6-0.8)
_BASE_BYTES = 1.5 * 2**30  # python, torch, RecBole, the data and the frozen SASRec

# Shapes of the offline aliases (their config.json), so that nothing needs converting before the projection.
_ALIAS_SHAPES = {
    "smollm2-135m": {"parameters": 134.5e6, "layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9},
    "gemma3-270m": {"parameters": 268.1e6, "layers": 18, "hidden": 640, "intermediate": 2048, "heads": 4},
    "tiny-random-llama": {"parameters": 5e4, "layers": 2, "hidden": 32, "intermediate": 64, "heads": 4},
}


class CPURunTooLarge(ConfigError):
    """An LLM run projected over an hour or over the memory on a CPU; the message names the way out."""


@dataclass
class Projection:
    train_batches: int  # per epoch
    train_tokens: int  # per micro-batch
    eval_users: int  # scored users over the whole run
    eval_tokens: int  # per scored user
    train_seconds: float  # whole run
    eval_seconds: float
    peak_bytes: float
    parameters: float

    @property
    def hours(self) -> float:
        return (self.train_seconds + self.eval_seconds) / 3600


def llm_shape(llm_path: str) -> dict | None:
    """Parameters, layers and widths of ``llm_path`` without loading it; None where unknown (a hub id)."""
    if llm_path in _ALIAS_SHAPES:
        return _ALIAS_SHAPES[llm_path]
    config_file = Path(llm_path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if not hidden or not layers:
        return None
    intermediate = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads", heads)
    per_layer = hidden * hidden * (2 + 2 * kv / heads) + 3 * hidden * intermediate
    parameters = layers * per_layer + config.get("vocab_size", 32000) * hidden
    return {"parameters": parameters, "layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads}


def matmul_flops_per_second(seconds: float = 0.2) -> float:
    """This machine's fp32 matrix-multiplication speed at decoder-like shapes (a fraction of a second)."""
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    a @ b
    start, repeats = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        repeats += 1
    return 2 * 1024 * 576 * 1536 * repeats / (time.perf_counter() - start)


def available_memory_bytes() -> float | None:
    """Memory this process may still take: MemAvailable, or the cgroup's limit if lower (Linux); None elsewhere."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _candidates_per_user(mode: str, n_items: int) -> int:
    return n_items if mode == "full" else int(mode[3:]) + 1 if mode[:3] in ("uni", "pop") else 20


def project(config, *, train_batches: int, n_users: int, n_items: int, title_chars: float, shape: dict,
            flops_per_second: float) -> Projection:
    """The run's projected time and peak memory (see the module docstring for the model)."""
    title_tokens = min(config["max_title_tokens"], max(1.0, title_chars / 3.5))
    extra = 3 if config["use_behaviour_tokens"] else 2  # separator, newline and the behavioural token
    history = min(config["max_history"], config["MAX_ITEM_LIST_LENGTH"] or config["max_history"])
    prompt = lambda candidates: 60 + (history + candidates) * (title_tokens + extra)  # noqa: E731
    train_tokens = int(config["train_batch_size"] * prompt(config["num_candidates"]))
    epochs = config["epochs"]
    modes = config["eval_args"]["mode"]
    valid_c, test_c = (_candidates_per_user(modes[phase], n_items) for phase in ("valid", "test"))
    validations = epochs // config["eval_step"] if config["eval_step"] else 0
    tests = 1 + (validations if config["learning_curve"] else 0)
    eval_tokens = int(prompt(min(test_c, 100)) + test_c * (title_tokens + 1))
    eval_users = n_users * (validations * valid_c / test_c + tests)
    speed = flops_per_second * _EFFICIENCY
    parameters = shape["parameters"]
    train_seconds = 6 * parameters * train_tokens * train_batches * epochs / speed
    eval_seconds = 2 * parameters * eval_tokens * eval_users / speed
    # Autograd keeps, per token and layer, about 28 hidden-wide and 6 intermediate-wide fp32 vectors and 3 rows of
    # attention weights per head (fitted to SmolLM2's ml-100k run killed at 24.3 GB: 16 prompts of ~350 tokens).
    width = train_tokens / config["train_batch_size"]
    per_token = shape["layers"] * (28 * shape["hidden"] + 6 * shape["intermediate"] + 3 * shape["heads"] * width) * 4
    peak = _BASE_BYTES + 4 * parameters + train_tokens * per_token
    return Projection(train_batches, train_tokens, int(eval_users), eval_tokens, train_seconds, eval_seconds, peak,
                      parameters)


def _describe(projection: Projection, config) -> str:
    return (f"about {_duration(projection.train_seconds + projection.eval_seconds)} (training "
            f"{projection.train_batches:,} batches x {config['epochs']} epoch(s) of {config['train_batch_size']} "
            f"prompts, ~{projection.train_tokens // config['train_batch_size']} tokens each, through a "
            f"{projection.parameters / 1e6:.1f}M-parameter LLM; scoring {projection.eval_users:,} users) and "
            f"{projection.peak_bytes / 2**30:.1f} GB of memory")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"


def _refuse(config, what: str) -> CPURunTooLarge:
    return CPURunTooLarge(
        f"{config['model']} on {config['dataset']} on this CPU: {what}. LLM runs are GPU jobs; to try the pipeline "
        f"on a CPU use the short preset {CPU_PRESET} (about 5 min and 9 GB), or set allow_slow_cpu_run: True "
        f"(--allow_slow_cpu_run=True) to run this anyway."
    )


def check_cpu_run(config, train_data, dataset, *, flops_per_second=None, available=None) -> Projection | None:
    """Before the gate encoder and the LLM: refuse (or, allowed, warn about) a CPU run that is too large."""
    from recbole_ilora.data import item_titles

    if torch.device(config["device"]).type != "cpu":
        return None
    shape = llm_shape(str(config["llm_path"]))
    if shape is None:
        getLogger().debug(f"No projection: the shape of llm_path={config['llm_path']!r} is unknown before loading it.")
        return None
    titles = [title for title in item_titles(dataset, config)[1:] if title]
    batches = len(train_data)
    batches = min(batches, config["limit_train_batches"]) if config["limit_train_batches"] else batches
    projection = project(
        config, train_batches=batches, n_users=dataset.user_num - 1, n_items=dataset.item_num - 1,
        title_chars=sum(map(len, titles)) / max(1, len(titles)), shape=shape,
        flops_per_second=flops_per_second or matmul_flops_per_second())
    available = available_memory_bytes() if available is None else available
    too_slow = projection.hours > MAX_CPU_HOURS
    too_big = available is not None and projection.peak_bytes > available
    text = _describe(projection, config)
    if too_big:
        text += f", more than the {available / 2**30:.1f} GB available"
    if (too_slow or too_big) and not config["allow_slow_cpu_run"]:
        raise _refuse(config, "projected " + text)
    log = getLogger().warning if too_slow or too_big else getLogger().info
    log(f"Projected on this CPU: {text}.")
    return projection


def recheck_after_first_step(step_seconds: float, projection: Projection | None, config) -> None:
    """The time check again, with a measured step (forward and backward) instead of the FLOP estimate."""
    if projection is None or torch.device(config["device"]).type != "cpu":
        return
    projected_step = projection.train_seconds / max(1, projection.train_batches * config["epochs"])
    ratio = step_seconds / projected_step if projected_step > 0 else 1.0
    seconds = (projection.train_seconds + projection.eval_seconds) * ratio
    if seconds / 3600 > MAX_CPU_HOURS and not config["allow_slow_cpu_run"]:
        raise _refuse(config, f"a measured training step of {step_seconds:.1f} s makes the run about "
                              f"{_duration(seconds)} (projected before: {_duration(projection.hours * 3600)})")
    getLogger().info(f"Measured on this CPU: {step_seconds:.1f} s per training batch; the run takes about "
                     f"{_duration(seconds)}.")

