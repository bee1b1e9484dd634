"""``DistributedDataParallel`` for RecBole's trainers: the wrapping, the training step, the trainer mixin.

RecBole's ``AbstractTrainer`` builds a CUDA-only DDP, routes only ``forward`` through it and averages
per-rank metrics. :func:`distributed_trainer` gives any trainer class :class:`DistributedTrainerMixin`
instead. A trainer whose loss is ``model.calculate_loss`` rather than RecBole's own training step (the
plugin's LLM trainer) says so with the class attribute ``ddp_forward_is_calculate_loss = True``: its
model is then wrapped as ``DDP(LossForward(model))``, with ``find_unused_parameters`` (curriculum
batches skip the projector) and :func:`gradient_sync` (``no_sync`` on the micro-batches of a gradient
accumulation window that do not end it). Only ``requires_grad`` tensors are all-reduced; the frozen
LLM is broadcast from rank 0 once when DDP is built. Baselines keep RecBole's training step on a DDP
whose ``device_ids`` also fit CPU modules.
"""

from __future__ import annotations

import inspect
import os
from contextlib import nullcontext

import torch
from torch import nn

from recbole_ilora.distributed.gather import GatheringCollector
from recbole_ilora.distributed.process_group import barrier, broadcast_object, is_distributed


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


# ------------------------------------------------------------------------------------ training
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
    """A new shard order every epoch (RecBole's ``DistributedSampler`` otherwise repeats the first)."""
    sampler = getattr(train_data, "sampler", None)
    if is_distributed() and getattr(train_data, "shuffle", False) and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch_idx)


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


# ------------------------------------------------------------------------------------- trainer
class DistributedTrainerMixin:
    """What a RecBole trainer needs to run on several processes, CPU or GPU (see the module docstring).

    Evaluation: every user is scored on exactly one rank (the sampler's padding duplicates are dropped)
    and the :class:`GatheringCollector` hands RecBole's evaluator all of them, so metrics and per-user
    vectors equal one process's. Only rank 0 writes checkpoints (RecBole's ``_save_checkpoint``).
    """

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
        # Not declared here: a class attribute of the mixin would hide the trainer's (it comes first in the MRO).
        loss_forward = bool(getattr(self, "ddp_forward_is_calculate_loss", False))
        if not loss_forward and torch.device(config["device"]).type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # as RecBole
        self.distributed_model = wrap_ddp(self.model, config, loss_forward=loss_forward)
        # The checkpoint name holds a timestamp: use rank 0's everywhere, it is the one written.
        self.saved_model_file = broadcast_object(self.saved_model_file)
        self.eval_collector = GatheringCollector(config)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if is_distributed() and eval_data:
            shard_without_padding(eval_data)
            sampler = eval_data.sampler
            self.eval_collector.local_samples = len(sampler) if sampler is not None else None
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
