"""Small helpers shared across the plugin: model lookup, the properties folder, fingerprints,
atomic writes, and which settings do not change a run's results.

Lookup follows RecBole-GNN: plugin classes first, then RecBole's own (trainers: ``recbole_ilora.trainer.get_trainer``).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from recbole.utils import get_model as get_recbole_model

PLUGIN_MODEL_PACKAGE = "recbole_ilora.model"

# Settings that change what a run prints or where it writes, never its metrics: they stay out of every
# cache key and results hash, so turning progress bars on or moving outputs re-runs nothing. The last
# line: what each process of a run derives from how it was started (its rank, device, rendezvous).
NON_RESULT_KEYS = frozenset(
    {"show_progress", "state", "checkpoint_dir", "output_root", "gpu_id", "use_gpu", "worker", "log_wandb",
     "resume", "checkpoint_every_steps", "log_every_steps", "learning_curve", "allow_slow_cpu_run",
     "local_rank", "device", "ip", "port", "offset", "group_offset", "ddp_init_method"}
)


def result_settings(settings) -> dict:
    """The settings of ``settings`` (a dict or a Config's ``final_config_dict``) that can change a run's results.

    The one definition: the leaderboard's results hash, the gate encoder's cache key and resume's check.
    """
    return {key: value for key, value in dict(settings).items() if key not in NON_RESULT_KEYS}


def differing_settings(recorded: dict, current: dict) -> str:
    """``"key=recorded (now current), ..."`` for every key whose value differs; empty when none does."""
    unset = "<unset>"
    keys = sorted(set(recorded) | set(current), key=str)
    return ", ".join(f"{key}={recorded.get(key, unset)!r} (now {current.get(key, unset)!r})"
                     for key in keys if recorded.get(key, unset) != current.get(key, unset))


# ---------------------------------------------------------------------------------------------- lookup
def get_model(model_name: str):
    """Return the model class called ``model_name``: a plugin model if one exists, else RecBole's.

    By name through importlib, as RecBole does: the models import this module, and a model's file is only
    loaded when asked for (the LLM models pull in transformers and peft).
    """
    module_path = f"{PLUGIN_MODEL_PACKAGE}.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is not None:
        return getattr(importlib.import_module(module_path), model_name)
    return get_recbole_model(model_name)


def is_plugin_model(model_name: str) -> bool:
    return importlib.util.find_spec(f"{PLUGIN_MODEL_PACKAGE}.{model_name.lower()}") is not None


# ------------------------------------------------------------------------------------------ properties
def properties_dir() -> Path:
    """The plugin's YAML defaults: ``properties/`` inside an installed wheel, or beside the package in a checkout."""
    packaged = Path(__file__).resolve().parent / "properties"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "properties"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"recbole_ilora's properties folder is missing (looked in {packaged} and {checkout}); reinstall the plugin."
    )


def resolve_properties_path(path: str | os.PathLike) -> Path:
    """``path`` as given if it exists; else, for ``properties/...``, the file shipped with the plugin.

    So that the README's ``--config_files=properties/cpu-demo.yaml`` also works from any directory once
    the plugin is installed from a wheel.
    """
    path = Path(path)
    if not path.exists() and path.parts[:1] == ("properties",):
        shipped = properties_dir().joinpath(*path.parts[1:])
        if shipped.exists():
            return shipped
    return path


# ---------------------------------------------------------------------------------------- fingerprints
def fingerprint(value, length: int = 12) -> str:
    """A short, stable hex digest of a JSON-serialisable value (key order does not matter)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def file_fingerprint(path: str | os.PathLike, length: int = 64) -> str:
    """Digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


# ------------------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a private temporary path beside ``path``; rename it onto ``path`` once the block succeeds.

    For files and folders alike. An interrupted write never looks finished, and concurrent processes
    writing the same target never see each other's halves. If another process created a folder target
    first, its copy is kept and ours is discarded (both hold the same content by construction).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        if partial.is_dir():
            try:
                partial.rename(path)
            except OSError:
                if not path.exists():
                    raise
                shutil.rmtree(partial)
        else:
            os.replace(partial, path)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists():
            partial.unlink()


# ------------------------------------------------------------------------------------------------- RNG
@contextmanager
def isolated_rng(*generators) -> Iterator[None]:
    """Run a block without changing the global random streams (python, numpy, torch CPU and CUDA), nor
    the states of ``generators`` (``torch.Generator`` objects such as a dataloader's own).

    For work whose RNG use depends on a cache (pretraining the gate encoder happens only when it is not
    cached yet), that only looks ahead (timing one batch) or that seeds its own draws (fixed evaluation
    negatives, the analysis's batches): the run's later draws are then the same. The plugin's one place
    for this; torch's streams through ``torch.random.fork_rng``.
    """
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    own_states = [generator.get_state() for generator in generators]
    # Every CUDA stream, even before CUDA is initialised: reading a state initialises it and applies the seed
    # init_seed queued, so a block that first touches the GPU (pretraining the gate encoder on a cache miss)
    # cannot leave the run's CUDA stream advanced by its dropout.
    devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        for generator, state in zip(generators, own_states):
            generator.set_state(state)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``deterministic_algorithms: true``: the block runs with torch's deterministic kernels (an operation that has
    none raises, naming itself), cuBLAS's fixed workspace and inductor's deterministic mode; the previous state after.

    RecBole's ``reproducibility`` fixes cuDNN's algorithms only; on a GPU, other backward kernels (attention,
    atomic reductions) may still sum in a different order from run to run. ``CUBLAS_WORKSPACE_CONFIG`` only acts
    when it is set before the process's first cuBLAS call: a process that used the GPU before the run should set it
    itself (a value already set is kept).
    """
    if not enabled:
        yield
        return
    import torch
    import torch._inductor.config as inductor_config

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              inductor_config.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    inductor_config.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        inductor_config.deterministic = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def device_description(device) -> str:
    """``device`` as a results record names it: the GPU's model beside ``cuda`` (``cuda (NVIDIA H200)``), so cells
    run on different GPUs say so; ``cpu`` as it is."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def release_device_memory() -> None:
    """Free what a finished run left: its objects (collected now, cycles included) and the CUDA allocator's cache,
    which would otherwise stay reserved by this process (for the next run's batch-size probe and for other processes
    sharing the GPU)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
