"""Make RecBole 1.2.1 work on today's stack: numpy 2, pandas 3, torch >= 2.6, setuptools without
``pkg_resources``; undo one global side effect of importing it; and root one output path it hard-codes.

RecBole 1.2.1 (its latest release) predates all four; no release fixes them. Every change to RecBole's
behaviour lives in this module, is applied once when :mod:`recbole_ilora` is imported, and has a test in
``tests/test_compat.py`` that fails without it. The fixes, by what breaks without them:

1. **numpy 2 aliases** -- ``Config.compatibility_settings`` does ``np.float = np.float_`` and
   ``np.float_``/``np.complex_``/``np.unicode_`` no longer exist, so *every* ``Config()`` raises.
   RecBole's metrics and dataset code then use ``np.float``/``np.bool``/``np.long``. We define the
   removed aliases to their numpy-2 meanings and replace ``compatibility_settings`` with that.
2. **pandas 3 copy-on-write** -- ``df[field].fillna(..., inplace=True)`` in ``Dataset._load_feat``
   and ``Dataset._fill_nan`` silently does nothing: missing values stay NaN (silent data corruption
   on any dataset with gaps; ml-100k has none). Rewritten to assign the filled column.
3. **pandas 3 ``Series.agg(len)``** -- now returns one number (the Series' length) instead of one
   length per row, so loading any ``token_seq`` field (titles, genres) fails with
   "Length of values (1) does not match length of index". Rewritten to ``Series.map(len)``.
4. **torch >= 2.6 ``weights_only=True``** -- RecBole's checkpoints pickle its ``Config``, so
   ``Trainer.evaluate(load_best_model=True)`` and ``Trainer.resume_checkpoint`` refuse to load the
   files RecBole itself just wrote. These two loads get ``weights_only=False``: they read only
   checkpoints written by the local trainer (never load untrusted checkpoints).
5. **global autograd anomaly detection** -- ``recbole/model/sequential_recommender/sine.py`` calls
   ``torch.autograd.set_detect_anomaly(True)`` at import, and importing *any* RecBole sequential model
   (SASRec included) imports it: every later backward pass in the process checks every op's output
   for NaN with a GPU sync, making LLM training several times slower (7x in our GPU benchmark; 21k
   isnan/any/item calls in 3 steps). We import RecBole's models once and switch it off again.
6. **ray / pkg_resources** -- ``recbole.quick_start`` imports ``ray.tune`` at module level, which
   fails on setuptools >= 81 (no ``pkg_resources``) and then on numpy 2 (``np.bool8``). Ray is only
   used for hyper-parameter search, so :mod:`recbole_ilora.quick_start` replaces RecBole's quick
   start and never imports it (nothing to patch here; the test checks we stay independent of it).

7. **TensorBoard beside the log** -- RecBole's ``get_tensorboard`` writes to ``./log_tensorboard``
   relative to the working directory whatever folder the run logs to. Replaced by a version that
   puts the events beside the run's log folder (``<root>/log/<model>/x.log`` -> ``<root>/log_tensorboard/x``;
   the same place as RecBole's for its own ``./log``), so that ``output_root`` holds every output; a Trainer
   without a log file writes under ``<output_root>/log_tensorboard/`` instead of ``./log_tensorboard``.
8. **CPU runs on a GPU machine** -- ``Config._init_device`` sets ``CUDA_VISIBLE_DEVICES`` to ``gpu_id`` even
   when it is empty (a CPU run), after torch may already have counted the GPUs: torch then believes in a
   GPU that CUDA no longer shows, and ``torch.compile`` fails with ``IndexError`` looking up its
   properties. An empty ``gpu_id`` now leaves the variable alone (the device is the CPU either way). And
   ``get_environment`` asks CUDA for the memory of a CPU device whenever a GPU exists, so every CPU run on
   a GPU machine ended in ``ValueError: Expected a cuda device``; it now reads the run's device.
9. **Console warnings** -- under pandas 3 every dataset load warned "The given NumPy array is not
   writable" (RecBole's tensors shared pandas' read-only column buffers: now a copy), every RecBole training
   "torch.cuda.amp.GradScaler(args...) is deprecated" (now ``torch.amp.GradScaler("cuda", ...)``), and every
   LLM model "`is_gradient_checkpointing` is deprecated" (peft reading transformers' property: filtered,
   that message from that module only).

Fixes 2-4, 8 and the first two of 9 rewrite single expressions inside RecBole methods (``_patch_source``).
Each rewrite asserts that the expression it replaces occurs exactly as often as in RecBole 1.2.1, so a different
RecBole version fails loudly at import instead of being patched half-way.
"""

from __future__ import annotations

import inspect
import textwrap
import warnings

import numpy as np

_APPLIED = False
_ORIGINALS: dict = {}  # (owner, method name) -> RecBole's own function, for tests and diagnostics

# Removed from numpy (1.24 / 2.0) but still used by RecBole 1.2.1. Only missing names are set, and not
# numpy 1's `float_`/`unicode_`: other libraries test for those to detect numpy 1.
_NUMPY_ALIASES = {
    "bool": np.bool_,
    "int": np.int_,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int_,
    "unicode": np.str_,
}

# The same rewrite in RecBole's Trainer and in NCLTrainer, which copies its epoch loop.
_CURRENT_GRAD_SCALER = [
    ("amp.GradScaler(enabled=self.enable_scaler)", 'torch.amp.GradScaler("cuda", enabled=self.enable_scaler)', 1),
]

# (module, class, method) -> [(old expression, new expression, expected occurrences)]
_SOURCE_FIXES = {
    ("recbole.data.dataset.dataset", "Dataset", "_load_feat"): [
        ('df[field].fillna(value="", inplace=True)', 'df[field] = df[field].fillna(value="")', 1),
    ],
    ("recbole.data.dataset.dataset", "Dataset", "_fill_nan"): [
        ("feat[field].fillna(value=0, inplace=True)", "feat[field] = feat[field].fillna(value=0)", 1),
        (
            "feat[field].fillna(value=feat[field].mean(), inplace=True)",
            "feat[field] = feat[field].fillna(value=feat[field].mean())",
            1,
        ),
    ],
    ("recbole.data.dataset.dataset", "Dataset", "_normalize"): [(".agg(len)", ".map(len)", 1)],
    ("recbole.data.dataset.dataset", "Dataset", "_discretization"): [(".agg(len)", ".map(len)", 2)],
    ("recbole.data.dataset.dataset", "Dataset", "_remap"): [(".agg(len)", ".map(len)", 1)],
    ("recbole.data.dataset.sequential_dataset", "SequentialDataset", "_benchmark_presets"): [
        (".agg(len)", ".map(len)", 1),
    ],
    ("recbole.data.dataset.kg_dataset", "KnowledgeBasedDataset", "_reset_ent_remapID"): [
        (".agg(len)", ".map(len)", 1),
    ],
    ("recbole.config.configurator", "Config", "_init_device"): [
        ('os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id', 'if gpu_id:\n            os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id', 1),
    ],
    ("recbole.utils.utils", None, "get_environment"): [
        ('if torch.cuda.is_available() and config["use_gpu"]', 'if config["device"].type == "cuda"', 1),
    ],
    # pandas 3 (copy-on-write) hands out read-only column arrays; torch.LongTensor(array) shares their memory,
    # warns that writing is undefined, and RecBole's tensors would alias the DataFrame: give torch a copy.
    ("recbole.data.dataset.dataset", "Dataset", "_dataframe_to_interaction"): [
        ("value = data[k].values", "value = data[k].to_numpy(copy=True)", 1),
    ],
    # torch.cuda.amp.GradScaler(...) is deprecated (a FutureWarning on every RecBole training, CPU too).
    ("recbole.trainer.trainer", "Trainer", "_train_epoch"): _CURRENT_GRAD_SCALER,
    ("recbole.trainer.trainer", "NCLTrainer", "_train_epoch"): _CURRENT_GRAD_SCALER,
    ("recbole.trainer.trainer", "Trainer", "resume_checkpoint"): [
        (
            "torch.load(resume_file, map_location=self.device)",
            "torch.load(resume_file, map_location=self.device, weights_only=False)",
            1,
        ),
    ],
    ("recbole.trainer.trainer", "Trainer", "evaluate"): [
        (
            "torch.load(checkpoint_file, map_location=self.device)",
            "torch.load(checkpoint_file, map_location=self.device, weights_only=False)",
            1,
        ),
    ],
}


# Warnings of one library about another's use of it, on every run, that no user can act on: filtered narrowly
# (message, category and the module that warns). (message regex, category, module regex)
_LIBRARY_WARNINGS = [
    # peft's get_peft_model reads transformers' deprecated PreTrainedModel.is_gradient_checkpointing.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
]


class RecBoleVersionError(RuntimeError):
    """RecBole's source is not the 1.2.1 this module was written against."""


def _numpy_compatibility_settings(self=None) -> None:
    """Replacement for ``recbole.config.Config.compatibility_settings`` that works on numpy 2."""
    for name, alias in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, alias)


def _patch_source(module_name: str, class_name: str | None, method_name: str, fixes) -> None:
    """Recompile one method of a RecBole class (or, with ``class_name`` None, one function of a module) with
    expressions replaced, in its own module's globals."""
    import importlib

    module = importlib.import_module(module_name)
    owner = module if class_name is None else getattr(module, class_name)
    function = owner.__dict__[method_name]
    source = textwrap.dedent(inspect.getsource(function))
    for old, new, expected in fixes:
        found = source.count(old)
        if found != expected:
            raise RecBoleVersionError(
                f"recbole_ilora.compat expected {expected} occurrence(s) of `{old}` in "
                f"{class_name or module_name}.{method_name} (RecBole 1.2.1) but found {found}. Install recbole==1.2.1 "
                f"or update recbole_ilora/compat.py for your RecBole version."
            )
        source = source.replace(old, new)
    namespace: dict = {}
    code = compile(source, inspect.getsourcefile(function), "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - RecBole's own source, one expression changed
    patched = namespace[method_name]
    patched.__qualname__ = function.__qualname__
    patched.__recbole_ilora_patched__ = True
    _ORIGINALS[(owner, method_name)] = function
    setattr(owner, method_name, patched)
    package = importlib.import_module(module_name.rpartition(".")[0])
    if class_name is None and getattr(package, method_name, None) is function:  # re-exported: `recbole.utils`
        setattr(package, method_name, patched)


def apply() -> None:
    """Apply every fix once (idempotent). Called by ``import recbole_ilora``."""
    global _APPLIED
    if _APPLIED:
        return
    _numpy_compatibility_settings()
    from recbole.config import configurator

    _ORIGINALS[(configurator.Config, "compatibility_settings")] = configurator.Config.compatibility_settings
    configurator.Config.compatibility_settings = _numpy_compatibility_settings
    for (module_name, class_name, method_name), fixes in _SOURCE_FIXES.items():
        _patch_source(module_name, class_name, method_name, fixes)
    import recbole.model.sequential_recommender  # noqa: F401 - imports sine.py, which enables anomaly mode
    import torch

    torch.autograd.set_detect_anomaly(False)
    from recbole.trainer import trainer

    _ORIGINALS[(trainer, "get_tensorboard")] = trainer.get_tensorboard
    trainer.get_tensorboard = _tensorboard_beside_log
    from recbole_ilora.progress import WarmProgress

    trainer.tqdm = WarmProgress  # RecBole's bars: no time estimate extrapolated from the first batches
    for message, category, module in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _APPLIED = True


def _tensorboard_beside_log(logger):
    """RecBole's ``get_tensorboard``, with the events folder placed beside the run's log folder."""
    # Imported here, not at the top: this module runs before anything imports RecBole (numpy aliases first).
    from recbole.utils import get_local_time
    from torch.utils.tensorboard import SummaryWriter

    from recbole_ilora.outputs import default_output_root, tensorboard_dir

    for handler in logger.handlers:
        if hasattr(handler, "baseFilename"):
            return SummaryWriter(str(tensorboard_dir(handler.baseFilename)))
    # No run log (a Trainer built outside a run, e.g. by a script): under output_root too, never ./log_tensorboard.
    return SummaryWriter(str(default_output_root() / "log_tensorboard" / f"model-{get_local_time()}"))


def original(owner: type, method_name: str):
    """RecBole's unpatched function (to show in tests what breaks without the fix)."""
    return _ORIGINALS[(owner, method_name)]


def is_patched(owner: type, method_name: str) -> bool:
    """Whether ``owner.method_name`` runs the rewritten source (used by tests and diagnostics)."""
    return getattr(getattr(owner, method_name), "__recbole_ilora_patched__", False)
