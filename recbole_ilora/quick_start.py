"""Train and test one model on one dataset: RecBole's ``run_recbole``, plugin-aware.

Replaces :mod:`recbole.quick_start`, which cannot be imported on the current stack (it imports
``ray.tune`` at module level; see :mod:`recbole_ilora.compat`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from logging import getLogger

import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_ilora import distributed
from recbole_ilora.config import Config
from recbole_ilora.evaluation import RecordingEvaluator, per_user_metrics
from recbole_ilora.utils import get_trainer, is_plugin_model


def count_trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peak_memory_gib(device) -> float | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def run_recbole_ilora(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    queue=None,
):
    """Train ``model`` on ``dataset`` and test it, as :func:`recbole.quick_start.run_recbole`.

    Returns RecBole's dict (``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``) plus ``test_per_user`` (per-user metric vectors on the test set),
    ``num_trainable_parameters``, ``train_time_s``, ``eval_time_s``, ``peak_memory_gib`` (None on CPU)
    and ``device``.
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    handlers_before = set(logging.getLogger().handlers)
    # RecBole's init_logger creates ./log/<model> with a check-then-mkdir that races between the processes
    # of a distributed run on a fresh checkout (FileExistsError); creating it here first is race-free.
    os.makedirs(os.path.join("log", config["model"]), exist_ok=True)
    # Its Trainer does the same with checkpoint_dir (leaderboard shards start together on a fresh checkout).
    os.makedirs(config["checkpoint_dir"], exist_ok=True)
    init_logger(config)
    distributed.quiet_other_ranks()  # distributed: only rank 0 logs
    try:
        return _train_and_test(config, saved, queue)
    finally:
        _remove_run_handlers(handlers_before)


def _train_and_test(config, saved, queue):
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    from recbole_ilora.data import check_atomic_files, check_dataset

    check_atomic_files(config)
    dataset = create_dataset(config)
    check_dataset(dataset, config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    distributed.prepare_eval_loaders(config, valid_data, test_data)  # fixed_eval_negatives; unpadded shards

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_class = config.model_class
    # distributed: rank 0 builds first (pretrains and caches the gate encoder), the others then reuse it.
    with distributed.main_process_first():
        model = model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)
    if not is_plugin_model(config["model"]):
        # thop profiling of an LLM forward is slow and meaningless for LoRA; keep it for baselines.
        transform = construct_transform(config)
        flops = get_flops(model, dataset, config["device"], logger, transform)
        logger.info(set_color("FLOPs", "blue") + f": {flops}")
    num_trainable = count_trainable_parameters(model)
    logger.info(set_color("Trainable parameters", "blue") + f": {num_trainable:,}")

    trainer_class = get_trainer(config["MODEL_TYPE"], config["model"])
    if not config["single_spec"]:
        trainer_class = distributed.distributed_trainer(trainer_class)  # DDP on CPU/gloo too; gathered metrics
    trainer = trainer_class(config, model)
    trainer.evaluator = RecordingEvaluator(config)
    if torch.device(config["device"]).type == "cuda":
        torch.cuda.reset_peak_memory_stats(config["device"])

    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=distributed.show_progress(config)
    )
    train_time = time.perf_counter() - start

    start = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=distributed.show_progress(config))
    eval_time = time.perf_counter() - start
    test_per_user = per_user_metrics(config, trainer.evaluator.last_struct)

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")

    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "test_per_user": test_per_user,
        "num_trainable_parameters": num_trainable,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "peak_memory_gib": _peak_memory_gib(config["device"]),
        "device": str(config["device"]),
    }
    if not config["single_spec"]:
        torch.distributed.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def _remove_run_handlers(handlers_before: set) -> None:
    # RecBole's init_logger configures the root logger with logging.basicConfig, a no-op once handlers
    # exist; removing this run's handlers lets the next run in the same process (tests, leaderboards)
    # log to its own file instead of the first run's.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers_before:
            handler.close()
            root.removeHandler(handler)
