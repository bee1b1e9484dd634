"""Small helpers shared across the plugin: model/trainer lookup, the properties folder, fingerprints,
atomic writes, and which settings do not change a run's results.

Lookup follows RecBole-GNN: plugin classes first, then RecBole's own.
"""

from __future__ import annotations

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
from recbole.utils import get_trainer as get_recbole_trainer

PLUGIN_MODEL_PACKAGE = "recbole_ilora.model"
PLUGIN_TRAINER_MODULE = "recbole_ilora.trainer"

# Settings that change what a run prints or where it writes, never its metrics: they stay out of every
# cache key and results hash, so turning progress bars on or moving outputs re-runs nothing.
NON_RESULT_KEYS = frozenset(
    {"show_progress", "state", "checkpoint_dir", "output_root", "gpu_id", "use_gpu", "worker", "log_wandb",
     "resume", "checkpoint_every_steps", "learning_curve", "allow_slow_cpu_run"}
)


# ---------------------------------------------------------------------------------------------- lookup
def get_model(model_name: str):
    """Return the model class called ``model_name``: a plugin model if one exists, else RecBole's."""
    module_path = f"{PLUGIN_MODEL_PACKAGE}.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is not None:
        return getattr(importlib.import_module(module_path), model_name)
    return get_recbole_model(model_name)


def get_trainer(model_type, model_name: str):
    """The plugin trainer named after the model or one of its base classes, else RecBole's choice.

    ``LLaRA`` and ``TALLRec`` subclass ``iLoRA`` and so train with ``iLoRATrainer``.
    """
    trainers = importlib.import_module(PLUGIN_TRAINER_MODULE)
    for model_class in get_model(model_name).__mro__:
        trainer = getattr(trainers, f"{model_class.__name__}Trainer", None)
        if trainer is not None:
            return trainer
    return get_recbole_trainer(model_type, model_name)


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
    cached yet) or that only looks ahead (timing one batch): the run's later draws are then the same.
    """
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    own_states = [generator.get_state() for generator in generators]
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for generator, state in zip(generators, own_states):
            generator.set_state(state)
