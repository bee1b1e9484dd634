"""Results of several processes combined into what one process reports.

:class:`GatheringCollector` is RecBole's evaluation ``Collector`` whose ``DataStruct`` holds every rank's
users, in the single-process order, so RecBole's evaluator computes the metrics once from all of them
(RecBole instead averages per-rank metrics after rounding, with wrong weights). The reductions sum or
average plain numbers: the training loss, the counts of the generation protocol, a stop request.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from recbole.evaluator import Collector

from recbole_ilora.distributed.process_group import gather_objects, get_world_size, is_distributed

# The per-sample entries of RecBole's DataStruct; the others (data.num_items, counts from the training
# data) are the same on every rank.
PER_SAMPLE_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def sum_across_ranks(values: dict) -> dict:
    """Element-wise sum of a dict of numbers over all ranks (counts of the generation protocol)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    totals = _all_reduce([float(values[k]) for k in keys])
    return {k: type(values[k])(v) for k, v in zip(keys, totals)}


def mean_across_ranks(value: float) -> float:
    if not is_distributed():
        return value
    return _all_reduce([float(value)])[0] / get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (all ranks must then take the same branch)."""
    if not is_distributed():
        return bool(flag)
    return _all_reduce([float(flag)], op=dist.ReduceOp.MAX)[0] > 0


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

    Per-sample tensors are gathered and interleaved back into the order one process would have produced
    (when every rank holds its ``local_samples`` rows of the sampler's r, r+W, ... split; else
    concatenated); anything else is the same on every rank and kept.
    """
    if not is_distributed():
        return struct
    local = {key: struct._data_dict[key].cpu() for key in PER_SAMPLE_KEYS if key in struct._data_dict}
    gathered = gather_objects((local_samples, local))
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


class GatheringCollector(Collector):
    """RecBole's ``Collector`` whose data struct holds the evaluation data of every rank.

    ``local_samples`` (the number of samples this rank's sampler yields, set before each evaluation)
    tells which tensors hold one row per sample.
    """

    local_samples: int | None = None

    def get_data_struct(self):
        return gather_data_struct(super().get_data_struct(), self.local_samples)
