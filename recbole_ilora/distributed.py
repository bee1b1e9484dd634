"""Data-parallel training and evaluation on several processes (RecBole's ``nproc``/``world_size``).

RecBole 1.2.1 has multi-process support -- ``local_rank``/``world_size``/``nproc``/``ip``/``port``/``offset``
settings, a ``DistributedSampler`` in every dataloader, ``DistributedDataParallel`` in ``Trainer``,
``mp.spawn`` in ``quick_start.run`` -- but only for CUDA and NCCL, it averages evaluation metrics over
ranks with wrong weights (``len(batched_data)`` is 4 per batch) after rounding and counts the users the
sampler duplicates to even out the shards, and it cannot route a loss that is not ``forward`` (iLoRA's
``calculate_loss``) through DDP with gradient accumulation. This module keeps RecBole's settings and
data sharding and fixes the rest, for RecBole's baselines and the plugin models alike:

- **process group**: :func:`init_distributed_device` (called by :class:`recbole_ilora.config.Config`
  when ``local_rank`` is set) uses ``gloo`` on CPU (``use_gpu: false``, empty ``gpu_id`` or no CUDA) and
  ``nccl`` on GPU (``ddp_backend`` overrides); ``torchrun`` is recognised (``env://``).
- **launch**: :func:`spawn` (``run_recbole_ilora.py --nproc=N``, RecBole's ``mp.spawn`` way) or
  ``torchrun --nproc_per_node=N run_recbole_ilora.py ...`` (:func:`torchrun_settings`).
- **training**: each rank trains on its shard (RecBole's ``DistributedSampler``; ``train_batch_size`` stays
  the *global* batch, as in RecBole). :func:`distributed_trainer` wraps any trainer class: plugin LLM
  models go through ``DDP(LossForward(model))`` so ``calculate_loss`` is DDP's forward, with
  ``find_unused_parameters`` (curriculum batches skip the projector) and ``no_sync`` on the micro-batches
  of a gradient-accumulation window; only ``requires_grad`` tensors (experts, gate, projector) are
  all-reduced; the frozen LLM is broadcast from rank 0 once when DDP is built and the frozen SASRec gate
  encoder is not a registered module (loaded from the same file on every rank). Baselines keep RecBole's
  own training step on a DDP whose ``device_ids`` also fit CPU modules.
- **evaluation**: every user is scored on exactly one rank (the sampler's padding duplicates are
  dropped), the per-user data RecBole's evaluator needs is gathered in the single-process order and the
  metrics are computed once from it, so N processes report what one does (per-user vectors included);
  ``fixed_eval_negatives`` makes uniN negatives depend on (seed, phase, user) only, not on how users
  are split into batches and ranks (on by default with several processes).
- **once-only work**: :func:`main_process_first` lets rank 0 build the model first (pretraining and
  caching the gate encoder, converting a GGUF LLM) while the others wait, then they reuse its files.
  Only rank 0 logs (RecBole's convention), writes checkpoints and returns results to the launcher.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import pickle
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Settings the launcher (not the Config) consumes; RecBole's names.
LAUNCH_KEYS = ("nproc", "world_size", "ip", "port", "group_offset", "offset")


# ------------------------------------------------------------------------------------------ state
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first while the others wait at a barrier, then the others run it.

    For work that writes a cache the others then read (gate encoder pretraining, GGUF conversion).
    """
    if not is_distributed():
        yield
        return
    if get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def sum_across_ranks(values: dict) -> dict:
    """Element-wise sum of a dict of numbers over all ranks (counts of the generation protocol)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return {k: type(values[k])(v) for k, v in zip(keys, tensor.tolist())}


def mean_across_ranks(value: float) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.item() / get_world_size()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------- process group
def torchrun_settings() -> dict:
    """Config settings of a process started by ``torchrun`` (empty when not started by it)."""
    env = os.environ
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return {}
    local_rank, rank = int(env["LOCAL_RANK"]), int(env["RANK"])
    return {
        "local_rank": local_rank,
        "world_size": int(env["WORLD_SIZE"]),
        "nproc": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
        "offset": rank - local_rank,
        "ip": env.get("MASTER_ADDR", "localhost"),
        "port": env.get("MASTER_PORT", "29500"),
        "ddp_init_method": "env://",
    }


def init_distributed_device(cfg: dict) -> None:
    """RecBole's ``Config._init_device`` for ``local_rank`` set, on CPU (gloo) as well as GPU (nccl).

    Fills ``device`` and ``single_spec`` (False).
    """
    gpu_id = cfg.get("gpu_id", "")
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id if gpu_id is not None else "")
    cfg["gpu_id"] = gpu_id
    local_rank = int(cfg["local_rank"])
    nproc = int(cfg.get("nproc") or 1)
    world_size = int(cfg.get("world_size") or -1)
    if world_size <= 0:
        world_size = nproc
    cfg["world_size"], cfg["nproc"] = world_size, nproc
    cfg.setdefault("offset", 0)
    use_gpu = cfg.get("use_gpu", True) is not False and gpu_id != ""
    if use_gpu and "ddp_init_method" not in cfg:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id  # as RecBole (mp.spawn children start without CUDA)
    use_cuda = use_gpu and torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() < nproc:
        raise ValueError(
            f"{nproc} processes on this node need {nproc} GPUs, but gpu_id={gpu_id!r} makes "
            f"{torch.cuda.device_count()} visible: pass --gpu_id=0,1,...,{nproc - 1} (or use_gpu=false for CPU)."
        )
    backend = cfg.get("ddp_backend") or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # N processes share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    if not dist.is_initialized():
        init_method = cfg.get("ddp_init_method") or f"tcp://{cfg.get('ip', 'localhost')}:{cfg.get('port', '5678')}"
        # Long timeout: the other ranks wait at a barrier while rank 0 pretrains the gate encoder.
        timeout = datetime.timedelta(seconds=float(cfg.get("ddp_timeout") or 7200))
        dist.init_process_group(
            backend=backend, init_method=init_method, rank=local_rank + int(cfg["offset"]), world_size=world_size,
            timeout=timeout,
        )
    cfg["device"] = device
    cfg["single_spec"] = False
    # Unlike RecBole, other ranks keep ``state`` and ``show_progress`` (the gate encoder's cache key hashes
    # them: every rank must find rank 0's file); :func:`quiet_other_ranks` silences them instead.


def quiet_other_ranks() -> None:
    """Only rank 0 logs (RecBole's convention): the others log errors only."""
    if get_rank() != 0:
        logging.getLogger().setLevel(logging.ERROR)


def show_progress(config) -> bool:
    return bool(config["show_progress"]) and get_rank() == 0


# ---------------------------------------------------------------------------------------- launch
def _spawn_worker(local_rank, model, dataset, config_file_list, config_dict, saved, result_path):
    import recbole_ilora  # noqa: F401 - compatibility fixes in the fresh process
    from recbole_ilora.quick_start import run_recbole_ilora

    config_dict = {**config_dict, "local_rank": local_rank}
    result = run_recbole_ilora(model, dataset, config_file_list=config_file_list, config_dict=config_dict, saved=saved)
    if local_rank == 0 and int(config_dict.get("offset", 0)) == 0:
        with open(result_path, "wb") as file:
            pickle.dump(result, file)


def spawn(model, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
          ip="localhost", port="5678", group_offset=0):
    """RecBole's ``quick_start.run`` for this plugin: ``nproc`` processes on this node with ``mp.spawn``.

    Returns global rank 0's result dict (``None`` on other nodes). Unlike RecBole's, the result travels
    through a file, not a pipe that blocks once it holds more than 64 KB (per-user metric vectors).
    """
    import torch.multiprocessing as mp

    config_dict = dict(config_dict or {})
    config_dict.update({
        "nproc": int(nproc), "world_size": int(world_size) if int(world_size) > 0 else int(nproc),
        "ip": str(ip), "port": str(port), "offset": int(group_offset),
    })
    with tempfile.TemporaryDirectory(prefix="recbole_ilora_ddp_") as folder:
        result_path = str(Path(folder) / "result.pkl")
        mp.spawn(
            _spawn_worker, args=(model, dataset, config_file_list, config_dict, saved, result_path),
            nprocs=int(nproc), join=True,
        )
        if not Path(result_path).is_file():
            return None
        with open(result_path, "rb") as file:
            return pickle.load(file)  # written just above by our own worker


def pop_launch_settings(overrides: dict) -> dict:
    """Remove RecBole's launch settings from command-line overrides and return them."""
    launch = {key: overrides.pop(key) for key in LAUNCH_KEYS if key in overrides}
    if "offset" in launch:
        launch.setdefault("group_offset", launch.pop("offset"))
    return launch


def wants_spawn(launch: dict) -> bool:
    return int(launch.get("nproc", 1)) > 1 or int(launch.get("world_size", -1)) > 0


# ----------------------------------------------------------------------------------------- model
class LossForward(nn.Module):
    """Makes ``model.calculate_loss`` the ``forward`` DDP calls (its parameters are the model's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


def _device_ids(config):
    device = torch.device(config["device"])
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None


def wrap_ddp(model: nn.Module, config, loss_forward: bool) -> nn.Module:
    """DDP over ``model`` (RecBole baselines) or over ``LossForward(model)`` (plugin LLM models).

    Parameters and buffers are broadcast from rank 0 once here: every rank starts from rank 0's
    weights whatever its seed. Only parameters with ``requires_grad`` get gradient buckets.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not loss_forward:
        return DistributedDataParallel(model, device_ids=_device_ids(config))
    find_unused = config["ddp_find_unused_parameters"]
    # An LLM's buffers (rotary frequencies) are constants: no broadcast before every forward.
    # (torch 2.13 renamed broadcast_buffers; both names are accepted where they exist.)
    buffers = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(
        LossForward(model),
        device_ids=_device_ids(config),
        # Curriculum (text-only) batches leave the projector without a gradient; DDP then averages the
        # ranks that used it and leaves it None where no rank did (AdamW skips it, as in one process).
        find_unused_parameters=True if find_unused is None else bool(find_unused),
        **{buffers: False},
    )


def training_loss(trainer, interaction):
    """The micro-batch loss, through DDP's forward when the trainer is distributed."""
    ddp = getattr(trainer, "distributed_model", None)
    if ddp is not None and isinstance(ddp.module, LossForward):
        return ddp(interaction)
    return trainer.model.calculate_loss(interaction)


def gradient_sync(trainer, sync: bool):
    """``no_sync`` on the micro-batches of an accumulation window that do not end it (forward and backward)."""
    ddp = getattr(trainer, "distributed_model", None)
    if ddp is None or sync:
        return nullcontext()
    return ddp.no_sync()


def set_sampler_epoch(train_data, epoch_idx: int) -> None:
    sampler = getattr(train_data, "sampler", None)
    if is_distributed() and getattr(train_data, "shuffle", False) and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch_idx)


# ------------------------------------------------------------------------------------ evaluation
def shard_without_padding(loader) -> None:
    """Give rank r the samples r, r+W, ... of ``loader`` exactly once (no padding duplicates).

    RecBole's ``DistributedSampler(drop_last=False)`` repeats the first samples so that every rank gets
    as many; in evaluation those users would be counted twice.
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, torch.utils.data.distributed.DistributedSampler) or sampler.shuffle:
        return
    total = len(sampler.dataset)
    sampler.drop_last = True
    sampler.total_size = total
    sampler.num_samples = len(range(sampler.rank, total, sampler.num_replicas))


def _interleave(parts: list, world: int):
    """Rows of rank r are the global samples r, r+W, ...: put them back in the single-process order."""
    total = sum(len(p) for p in parts)
    template = next(p for p in parts if p is not None)
    out = torch.empty((total, *template.shape[1:]), dtype=template.dtype)
    for rank, part in enumerate(parts):
        if len(part):
            out[rank::world][: len(part)] = part
    return out


def gather_data_struct(struct, local_samples: int | None):
    """RecBole's evaluation ``DataStruct`` of every rank, merged into the single-process one.

    Per-sample tensors (``rec.topk``, ``rec.meanrank``, ``rec.score``, ``rec.items``, ``data.label``)
    are gathered and interleaved back into the order one process would have produced; anything else
    (``data.num_items``, counters from the training data) is the same on every rank and kept.
    """
    if not is_distributed():
        return struct
    keys = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")
    local = {key: struct._data_dict[key].cpu() for key in keys if key in struct._data_dict}
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, (local_samples, local))
    world = get_world_size()
    for key in sorted({k for _, d in gathered for k in d}):
        parts = [d.get(key) for _, d in gathered]
        template = next(p for p in parts if p is not None)
        parts = [p if p is not None else template[:0] for p in parts]
        per_sample = all(n is not None and len(p) == n for p, (n, _) in zip(parts, gathered))
        sizes = [len(p) for p in parts]
        in_order = per_sample and all(sizes[r] == len(range(r, sum(sizes), world)) for r in range(world))
        struct._data_dict[key] = _interleave(parts, world) if in_order else torch.cat(parts, 0)
    return struct


def _neg_sampling_seeded_per_user(loader, seed: int, phase: str):
    original = loader._neg_sampling
    uid_field = loader._dataset.uid_field
    phase_code = {"train": 0, "valid": 1, "test": 2}.get(phase, 3)

    def seeded(inter_feat):
        users = inter_feat[uid_field]
        if len(users) == 0 or bool((users != users[0]).any()):
            return original(inter_feat)  # not one user's rows: leave RecBole's sampling as it is
        state = np.random.get_state()
        np.random.seed(int(np.random.SeedSequence([int(seed), phase_code, int(users[0])]).generate_state(1)[0]))
        try:
            return original(inter_feat)
        finally:
            np.random.set_state(state)

    loader._neg_sampling = seeded


def prepare_eval_loaders(config, *loaders) -> None:
    """Apply ``fixed_eval_negatives`` to the uniN evaluation loaders (and unpad them when distributed).

    ``fixed_eval_negatives``: ``true`` draws each user's evaluation negatives from a generator seeded by
    (seed, phase, user), so they do not depend on the batches, the ranks or the epoch; ``false`` keeps
    RecBole's single global stream; unset means true with several processes, false with one.
    """
    from recbole.data.dataloader import NegSampleEvalDataLoader

    fixed = config["fixed_eval_negatives"]
    fixed = (not config["single_spec"]) if fixed is None else bool(fixed)
    for loader in loaders:
        if loader is None:
            continue
        if not config["single_spec"]:
            shard_without_padding(loader)
        if (
            fixed and isinstance(loader, NegSampleEvalDataLoader) and getattr(loader, "neg_sample_args", None)
            and loader.neg_sample_args.get("distribution") != "none" and loader.neg_sample_args.get("sample_num") != "none"
        ):
            phase = getattr(loader._sampler, "phase", None) or "test"
            _neg_sampling_seeded_per_user(loader, config["seed"], phase)


# --------------------------------------------------------------------------------------- trainer
class DistributedTrainerMixin:
    """What a RecBole trainer needs to run on several processes, CPU or GPU (see the module docstring)."""

    def __init__(self, config, model):
        single_spec = config["single_spec"]
        os.makedirs(config["checkpoint_dir"], exist_ok=True)  # RecBole's ensure_dir races between ranks
        config["single_spec"] = True  # keeps RecBole's AbstractTrainer from building its CUDA-only DDP
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = single_spec
        if single_spec:
            return
        from recbole_ilora.trainer import iLoRATrainer

        loss_forward = isinstance(self, iLoRATrainer)
        if not loss_forward and torch.device(config["device"]).type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # as RecBole
        self.distributed_model = wrap_ddp(self.model, config, loss_forward=loss_forward)
        # The checkpoint name holds a timestamp: use rank 0's everywhere, it is the one written.
        self.saved_model_file = broadcast_object(self.saved_model_file)
        collector, local_struct = self.eval_collector, self.eval_collector.get_data_struct
        collector.get_data_struct = lambda: gather_data_struct(local_struct(), getattr(self, "_local_eval_samples", None))

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if is_distributed() and eval_data:
            shard_without_padding(eval_data)
            self._local_eval_samples = len(eval_data.sampler) if eval_data.sampler is not None else None
            if load_best_model:
                barrier()  # rank 0 has finished writing the checkpoint every rank now reads
        return super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                show_progress=show_progress)

    def _map_reduce(self, result, num_sample):
        return result  # metrics were computed from every rank's gathered data: nothing to average


def distributed_trainer(trainer_class):
    """``trainer_class`` with :class:`DistributedTrainerMixin` (a no-op with one process)."""
    if issubclass(trainer_class, DistributedTrainerMixin):
        return trainer_class
    return type(f"Distributed{trainer_class.__name__}", (DistributedTrainerMixin, trainer_class), {})
