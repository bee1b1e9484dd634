"""The process group: who am I, how many are we, and the once-only work of rank 0.

:func:`init_distributed_device` is what :class:`recbole_ilora.config.Config` calls in place of RecBole's
``_init_device`` when ``local_rank`` is set; this module imports nothing else of the plugin, so the
config can import it.
"""

from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

# Settings the launcher (recbole_ilora.launch, not the Config) consumes; RecBole's names.
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


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` with one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ------------------------------------------------------------------------------------- the device
def cpu_threads_per_process(nproc: int) -> int:
    """Threads of each of ``nproc`` CPU processes: ``OMP_NUM_THREADS`` if set, else an equal share of the cores
    (instead of every process oversubscribing all of them)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // nproc)


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
        torch.set_num_threads(cpu_threads_per_process(nproc))
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
