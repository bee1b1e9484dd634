"""``train_batch_size``, ``gradient_accumulation_steps``, ``eval_batch_size``: ``auto`` sizes them for the device.

The optimiser always sees ``effective_batch_size`` prompts per step (the authors' 128); ``auto`` chooses how
many of them one forward/backward pass holds.

- On a CPU, when the config is built (:func:`provisional_batch_sizes`): 16 prompts x 8 micro-batches and 320
  evaluation rows (16 users x 20 candidates under uni19) -- small batches keep a CPU's memory low.
- On a GPU those values are provisional. Once the model is built, :func:`fit_batch_sizes_to_device` probes
  the largest training micro-batch of 128, 64, 32, 16 whose forward and backward pass over the training
  set's longest prompts peaks within ``MEMORY_SHARE`` of the GPU's memory, derives the accumulation that keeps
  the effective batch, and likewise the largest evaluation batch of 1024, 512, ... users that scores within
  it. A micro-batch of 128 runs each sample about 3x faster than 16 x 8 on an H200. The choice is logged and
  cached per GPU, memory and model shape in ``<checkpoint_dir>/batch-sizes.json``: probed once, and the same
  command picks the same sizes again. The probe changes no weight and draws no random number the run sees.

A value given explicitly is kept (``--train_batch_size=64`` leaves ``gradient_accumulation_steps: auto`` to
derive 2). Several runs sharing one GPU should give sizes explicitly: each probe assumes the memory is its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from logging import getLogger
from pathlib import Path

import torch

from recbole_ilora.settings import SettingError
from recbole_ilora.utils import atomic_path, fingerprint, isolated_rng

AUTO = "auto"
AUTO_KEYS = ("train_batch_size", "gradient_accumulation_steps", "eval_batch_size")
TRAIN_SIZES = (128, 64, 32, 16)  # prompts per micro-batch, tried largest first
# Users per evaluation batch. Larger batches pay on a GPU: each batch waits for the device a few times (candidate
# groups, pack widths, RecBole's collection), so fewer batches keep it busier.
EVAL_USERS = (1024, 512, 256, 128, 64, 32, 16)
CPU_EVAL_ROWS = 320
MEMORY_SHARE = 0.8  # of the GPU's memory: headroom for prompts longer than the probe's and for the allocator
CACHE_FILE = "batch-sizes.json"
# What a step's memory depends on (besides the GPU): the cache key.
SHAPE_KEYS = ("model", "dataset", "llm_path", "llm_dtype", "lora_rank", "lora_target_modules", "num_experts",
              "use_behaviour_tokens", "user_token", "max_history", "num_candidates", "max_title_tokens",
              "score_attention", "score_pack_tokens", "eval_args", "effective_batch_size", "world_size")


def auto_keys(config) -> tuple[str, ...]:
    """The batch settings of ``config`` that are ``auto``."""
    return tuple(key for key in AUTO_KEYS if config[key] == AUTO)


def _train_sizes(config) -> tuple[int, ...]:
    """The micro-batches of ``TRAIN_SIZES`` that divide ``effective_batch_size``, largest first."""
    effective = int(config["effective_batch_size"])
    sizes = tuple(size for size in TRAIN_SIZES if size <= effective and effective % size == 0)
    if not sizes:
        source = config._source.get("effective_batch_size", "default") if hasattr(config, "_source") else "default"
        raise SettingError(f"Setting effective_batch_size={effective!r} ({source}) is not a multiple of "
                           f"{min(TRAIN_SIZES)}, which train_batch_size: auto needs (micro-batches of "
                           f"{', '.join(map(str, TRAIN_SIZES))}). Use e.g. 128, or give train_batch_size explicitly.")
    return sizes


def accumulation_for(effective: int, micro_batch: int) -> int:
    """Micro-batches per optimiser step that come closest to ``effective`` prompts (at least one)."""
    return max(1, round(effective / micro_batch))


def provisional_batch_sizes(config) -> tuple[str, ...]:
    """Replace ``auto`` by the CPU sizes (final on a CPU, provisional on a GPU); returns the keys that were auto.

    Called when the config is built, so every reader of the config (RecBole's data loaders included) sees
    numbers; on a GPU :func:`fit_batch_sizes_to_device` replaces them once the model exists.
    """
    keys = auto_keys(config)
    if not keys:
        return keys
    if "train_batch_size" in keys:
        config["train_batch_size"] = _train_sizes(config)[-1]  # the smallest: 16
    if "gradient_accumulation_steps" in keys:
        config["gradient_accumulation_steps"] = accumulation_for(int(config["effective_batch_size"]),
                                                                 config["train_batch_size"])
    if "eval_batch_size" in keys:
        config["eval_batch_size"] = CPU_EVAL_ROWS
    return keys


# ----------------------------------------------------------------------------------------------- the probe
@dataclass
class FittedSizes:
    train_batch_size: int | None  # per process
    eval_users: int | None
    train_peak_gib: float | None
    eval_peak_gib: float | None
    budget_gib: float


class CudaMemory:
    """The GPU a probe measures: its name, its memory, and the peak memory of a call."""

    def __init__(self, device: torch.device):
        self.device = device
        properties = torch.cuda.get_device_properties(device)
        self.name, self.total_gib = properties.name, properties.total_memory / 2**30

    def peak_gib(self, run, rows: int) -> float | None:
        """Peak memory of ``run()`` in GiB, or None when it runs out of memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            run()
        except torch.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(self.device) / 2**30


def _cache_key(config, memory) -> dict:
    key = {"gpu": memory.name, "gpu_memory_gib": round(memory.total_gib, 1), "torch": torch.__version__,
           **{key: config[key] for key in SHAPE_KEYS if key in config}}
    # The listwise loss scores every candidate with gradients: more memory per prompt. Keyed only when it is on
    # (which losses, not their weights), so the entries of LM-loss runs stay valid.
    if config["listwise_loss_weight"]:
        key["losses"] = ["lm", "listwise"] if config["lm_loss_weight"] else ["listwise"]
    return key


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _longest_training_rows(model, train_data, size: int):
    """The ``size`` training samples whose history and answer titles hold the most tokens: the widest prompts."""
    samples = train_data._dataset.inter_feat
    history, _ = model.recent_history(samples)
    title_len = model.prompt.title_len.cpu()
    tokens = title_len[history].sum(1) + title_len[samples[model.POS_ITEM_ID]]
    return samples[torch.topk(tokens, min(size, len(tokens))).indices]


def _evaluation_rows(test_data, users: int):
    """The first ``users`` users of the test loader with their candidate rows, in one interaction."""
    from recbole.data.interaction import cat_interactions

    uid = test_data._dataset.uid_field
    parts, seen = [], 0
    for batch in test_data:  # a batch holds whole users
        parts.append(batch[0] if isinstance(batch, tuple) else batch)
        seen += len(torch.unique(parts[-1][uid]))
        if seen >= users:
            break
    rows = cat_interactions(parts)
    keep = torch.isin(rows[uid], torch.unique(rows[uid])[:users])
    return rows[torch.nonzero(keep).squeeze(1)]


def _ranks_everything(eval_data) -> bool:
    from recbole.data.dataloader import FullSortEvalDataLoader

    return isinstance(eval_data, FullSortEvalDataLoader)


def probe(model, train_data, test_data, memory, train_sizes, eval_users) -> FittedSizes:
    """The largest sizes whose peak memory stays within the budget (None: not even the smallest fits)."""
    budget = MEMORY_SHARE * memory.total_gib
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training, progress = model.training, model.training_progress
    model.training_progress = 1.0  # every prompt with its behavioural tokens: the widest (curriculum off)

    def train_step(rows):
        model.train()
        with torch.compiler.set_stance("force_eager"):
            model.calculate_loss(rows.to(device)).backward()
        for parameter in trainable:
            parameter.grad = None

    @torch.no_grad()
    def score(rows):
        model.eval()
        # FlexAttention has no eager kernel (its eager fallback holds every score of the sequence): under flex the
        # probe scores as the evaluation will, compiled.
        stance = "default" if model.scorer.uses_flex(device, many_candidates=_ranks_everything(test_data)) else "force_eager"
        with torch.compiler.set_stance(stance):
            (model.full_sort_predict if _ranks_everything(test_data) else model.predict)(rows.to(device))

    fitted_train = fitted_eval = train_peak = eval_peak = None
    try:
        for size in train_sizes:
            rows = _longest_training_rows(model, train_data, size)
            train_peak = memory.peak_gib(lambda: train_step(rows), len(rows))
            if train_peak is not None and train_peak <= budget:
                fitted_train = size
                break
        for users in eval_users:
            rows = _evaluation_rows(test_data, users)
            eval_peak = memory.peak_gib(lambda: score(rows), len(rows))
            if eval_peak is not None and eval_peak <= budget:
                fitted_eval = users
                break
    finally:
        model.train(was_training)
        model.training_progress = progress
        for parameter in trainable:
            parameter.grad = None
    return FittedSizes(fitted_train, fitted_eval, train_peak, eval_peak, budget)


def fit_batch_sizes_to_device(config, model, train_data, test_data, keys: tuple[str, ...], memory=None) -> bool:
    """On a GPU, replace the provisional sizes of ``keys`` (those given as ``auto``) by the device's; returns
    whether any changed (the caller then rebuilds the data loaders). On a CPU: nothing to do.

    ``memory``: the device to fit (default: ``config["device"]`` when it is a GPU; tests pass a simulated one).
    """
    device = torch.device(config["device"])
    if memory is None and device.type == "cuda":
        memory = CudaMemory(device)
    if memory is None or not keys:
        return False
    from recbole_ilora.distributed import gather_objects, get_world_size

    logger = getLogger()
    world = get_world_size()
    effective = int(config["effective_batch_size"])
    train_sizes = tuple(s for s in _train_sizes(config) if s * world <= effective) or (min(TRAIN_SIZES),)
    key = {**_cache_key(config, memory), "probed": sorted(set(keys) - {"gradient_accumulation_steps"}),
           "tried": {"train": list(train_sizes), "eval_users": list(EVAL_USERS)}}  # other candidates: probe again
    cache_path = Path(config["checkpoint_dir"]) / CACHE_FILE
    cached = _read_cache(cache_path).get(fingerprint(key))
    if cached is not None:
        fitted = FittedSizes(**cached["fitted"])
        origin = f"cached in {cache_path}"
    else:
        with isolated_rng(train_data.generator):
            fitted = probe(model, train_data, test_data, memory, train_sizes if "train_batch_size" in keys else (),
                           EVAL_USERS if "eval_batch_size" in keys else ())
        origin = f"probed on {key['gpu']} ({key['gpu_memory_gib']} GiB), written to {cache_path}"
    # distributed: every rank takes the smallest size any rank fits
    fits = gather_objects((fitted.train_batch_size, fitted.eval_users))
    if "train_batch_size" in keys and any(train is None for train, _ in fits):
        raise SettingError(
            f"train_batch_size: auto: not even {min(train_sizes)} prompts per micro-batch fit within "
            f"{fitted.budget_gib:.1f} GiB of {key['gpu']} (peak {fitted.train_peak_gib}). Give a smaller "
            f"--train_batch_size (gradient_accumulation_steps: auto keeps the effective batch), or a smaller "
            f"max_title_tokens or num_candidates.")
    if cached is None:
        with atomic_path(cache_path) as partial:
            entries = _read_cache(cache_path)
            entries[fingerprint(key)] = {"key": key, "fitted": asdict(fitted)}
            Path(partial).write_text(json.dumps(entries, indent=1, default=str), encoding="utf-8")
    before = {name: config[name] for name in AUTO_KEYS}
    if "train_batch_size" in keys:
        config["train_batch_size"] = min(train for train, _ in fits) * world
    if "gradient_accumulation_steps" in keys:
        config["gradient_accumulation_steps"] = accumulation_for(effective, config["train_batch_size"])
    if "eval_batch_size" in keys:
        users = min((users for _, users in fits if users is not None), default=None)
        if users is not None:  # uniN: the target and N negatives per user; a full ranking: one row
            config["eval_batch_size"] = users * (1 if _ranks_everything(test_data) else _rows_per_user(test_data))
    logger.info(
        f"Batch sizes for the device ({', '.join(keys)}: auto; {origin}): {config['train_batch_size']} prompts x "
        f"{config['gradient_accumulation_steps']} micro-batch(es) per optimiser step (training peak "
        f"{_gib(fitted.train_peak_gib)}), evaluation batches of {config['eval_batch_size']} rows (peak "
        f"{_gib(fitted.eval_peak_gib)}); budget {fitted.budget_gib:.1f} GiB")
    return before != {name: config[name] for name in AUTO_KEYS}


def loaders_at_fitted_sizes(config, train_data, valid_data, test_data) -> tuple:
    """The loaders again at the config's (fitted) batch sizes: the same datasets and samplers that RecBole's
    ``data_preparation`` built them from (a dataset is built only once)."""
    from recbole_ilora.evaluation import prepare_eval_loaders

    train = type(train_data)(config, train_data._dataset, train_data._sampler, shuffle=config["shuffle"])
    valid, test = (type(loader)(config, loader._dataset, loader._sampler, shuffle=False) for loader in (valid_data, test_data))
    prepare_eval_loaders(config, valid, test)  # fixed_eval_negatives, as for the first ones
    return train, valid, test


def _gib(value) -> str:
    return "not probed" if value is None else f"{value:.1f} GiB"


def _rows_per_user(eval_data) -> int:
    return int(eval_data.times)  # RecBole's NegSampleEvalDataLoader: rows per user (1 + negatives)
