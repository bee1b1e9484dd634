"""Data-parallel training and evaluation on several processes (RecBole's ``nproc``/``world_size``).

RecBole 1.2.1 has multi-process support -- ``local_rank``/``world_size``/``nproc``/``ip``/``port``/``offset``
settings, a ``DistributedSampler`` in every dataloader, ``DistributedDataParallel`` in ``Trainer``,
``mp.spawn`` in ``quick_start.run`` -- but only for CUDA and NCCL, it averages evaluation metrics over
ranks with wrong weights (``len(batched_data)`` is 4 per batch) after rounding and counts the users the
sampler duplicates to even out the shards, and it cannot route a loss that is not ``forward`` (iLoRA's
``calculate_loss``) through DDP with gradient accumulation. This package keeps RecBole's settings and
data sharding and fixes the rest, for RecBole's baselines and the plugin models alike:

- :mod:`~recbole_ilora.distributed.process_group`: :func:`init_distributed_device` (called by
  :class:`recbole_ilora.config.Config` when ``local_rank`` is set) uses ``gloo`` on CPU (``use_gpu: false``,
  empty ``gpu_id`` or no CUDA) and ``nccl`` on GPU (``ddp_backend`` overrides); rank queries;
  :func:`main_process_first` lets rank 0 build the model first (pretraining and caching the gate encoder,
  converting a GGUF LLM) while the others wait, then they reuse its files. Only rank 0 logs.
- :mod:`recbole_ilora.launch` (above this package, beside the command line): ``run_recbole_ilora.py
  --nproc=N`` (RecBole's ``mp.spawn`` way) or ``torchrun --nproc_per_node=N run_recbole_ilora.py ...``.
- :mod:`~recbole_ilora.distributed.ddp`: each rank trains on its shard (RecBole's ``DistributedSampler``;
  ``train_batch_size`` stays the *global* batch, as in RecBole); :func:`distributed_trainer` wraps any
  trainer class in DDP, plugin LLM models through their ``calculate_loss``.
- :mod:`~recbole_ilora.distributed.gather`: every evaluation user is scored on exactly one rank and the
  per-user data RecBole's evaluator needs is gathered in the single-process order, so N processes
  report what one does (per-user vectors included). With ``fixed_eval_negatives`` (the default, see
  :mod:`recbole_ilora.evaluation.negatives`) uniN candidates do not depend on how users are split into
  batches and ranks either.
"""

from recbole_ilora.distributed.ddp import (
    DistributedTrainerMixin,
    LossForward,
    distributed_trainer,
    gradient_sync,
    set_sampler_epoch,
    shard_without_padding,
    training_loss,
    wrap_ddp,
)
from recbole_ilora.distributed.gather import (
    GatheringCollector,
    any_rank,
    gather_data_struct,
    mean_across_ranks,
    sum_across_ranks,
)
from recbole_ilora.distributed.process_group import (
    LAUNCH_KEYS,
    barrier,
    broadcast_object,
    gather_objects,
    get_rank,
    get_world_size,
    init_distributed_device,
    is_distributed,
    main_process_first,
    quiet_other_ranks,
    show_progress,
)

__all__ = [
    "LAUNCH_KEYS", "DistributedTrainerMixin", "GatheringCollector", "LossForward", "any_rank", "barrier", "broadcast_object",
    "distributed_trainer", "gather_data_struct", "gather_objects", "get_rank", "get_world_size", "gradient_sync",
    "init_distributed_device", "is_distributed", "main_process_first", "mean_across_ranks", "quiet_other_ranks",
    "set_sampler_epoch", "shard_without_padding", "show_progress", "sum_across_ranks", "training_loss", "wrap_ddp",
]
