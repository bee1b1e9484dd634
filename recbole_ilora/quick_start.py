"""Train and test one model on one dataset: RecBole's ``run_recbole``, plugin-aware.

Replaces :mod:`recbole.quick_start`, which cannot be imported on the current stack (it imports
``ray.tune`` at module level; see :mod:`recbole_ilora.compat`).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from logging import getLogger

import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_seed, set_color

from recbole_ilora import distributed
from recbole_ilora.batch_sizes import fit_batch_sizes_to_device, loaders_at_fitted_sizes
from recbole_ilora.checkpoints import eval_checkpoint_config
from recbole_ilora.config import Config
from recbole_ilora.data import check_atomic_files, check_dataset
from recbole_ilora.evaluation import RecordingEvaluator, per_user_metrics, prepare_eval_loaders
from recbole_ilora.interrupt import TrainingInterrupted
from recbole_ilora.outputs import dataset_summary, init_logger, resolve_checkpoint_dir, show_progress_bars
from recbole_ilora.pipeline import build_model
from recbole_ilora.projection import check_cpu_run, recheck_after_first_step
from recbole_ilora.score_fusion import LLMScoreReplay, choose_fusion_weight, scoring_with, without_generation
from recbole_ilora.settings import check_run_environment
from recbole_ilora.trainer import get_trainer, resume_training
from recbole_ilora.utils import deterministic_algorithms, device_description, is_plugin_model, isolated_rng



def count_trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peak_memory_gib(device) -> float | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def plain(result):
    """RecBole's metric dicts hold numpy scalars (printed ``np.float64(0.07)`` under numpy 2): plain floats."""
    if isinstance(result, dict):
        return {key: plain(value) for key, value in result.items()}
    return result.item() if hasattr(result, "item") and getattr(result, "ndim", 1) == 0 else result


def run_recbole_ilora(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
):
    """Train ``model`` on ``dataset`` and test it, as :func:`recbole.quick_start.run_recbole`.

    Returns RecBole's dict (``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``, metrics as plain floats) plus ``test_per_user`` (per-user metric vectors on the test
    set), ``num_trainable_parameters``, ``train_time_s``, ``eval_time_s``, ``peak_memory_gib`` (None on
    CPU), ``device`` (the GPU's model beside ``cuda``) and ``log_file``. With ``score_fusion`` (plugin models),
    ``score_fusion`` too: the SASRec ``weight`` chosen on validation, ``valid_by_weight`` (the valid metric at
    every weight), and the fused ``best_valid_result``, ``test_result``, ``test_per_user`` and ``eval_time_s``; the
    plain results stay the LLM's.
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    if config["eval_checkpoint"]:
        config = eval_checkpoint_config(config)  # the settings it was trained with (one line if contradicted)
    check_run_environment(config)  # the GPU asked for exists, the LLM is installed: before any work
    init_seed(config["seed"], config["reproducibility"])
    resolve_checkpoint_dir(config)
    handlers_before = set(logging.getLogger().handlers)
    log_file = init_logger(config)
    distributed.quiet_other_ranks()  # distributed: only rank 0 logs
    try:
        with deterministic_algorithms(config["deterministic_algorithms"]):
            return {**_train_and_test(config, saved), "log_file": str(log_file)}
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, TrainingInterrupted):
            raise  # the plugin trainer stopped at a step and said how to resume
        # A RecBole baseline (whose trainer has no handler), or a second Ctrl-C: one line, no traceback.
        message = f"Interrupted: {config['model']} on {config['dataset']} stopped at once, without a resume checkpoint."
        getLogger().warning(message)
        raise TrainingInterrupted(message) from None
    finally:
        _remove_run_handlers(handlers_before)


def _train_and_test(config, saved):
    logger = getLogger()
    logger.debug(f"Command line: {sys.argv}")
    logger.debug(config)
    logger.info(set_color("Protocol", "blue") + f": {config.protocol()}")
    if getattr(config, "inferred_columns", None):
        logger.info(config.inferred_columns)

    check_atomic_files(config)
    dataset = create_dataset(config)
    check_dataset(dataset, config)
    logger.debug(dataset)  # RecBole's statistics (its counts include the padding ids): the log file
    logger.info(dataset_summary(dataset))
    train_data, valid_data, test_data = data_preparation(config, dataset)
    prepare_eval_loaders(config, valid_data, test_data)  # fixed_eval_negatives: candidates per (seed, phase, user)

    # LLM runs on a CPU: projected time and memory before the gate encoder and the LLM; refused when too large.
    projection = check_cpu_run(config, train_data, dataset) if is_plugin_model(config["model"]) else None

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    # distributed: rank 0 builds first (pretrains and caches the gate encoder), the others then reuse it.
    with distributed.main_process_first():
        model = build_model(config, train_data._dataset).to(config["device"])  # iLoRA: pretrains its SASRec first
    logger.debug(model)
    if fit_batch_sizes_to_device(config, model, train_data, test_data, getattr(config, "auto_batch_sizes", ())):
        # auto on a GPU: the loaders again, at the sizes fitted to the device (drawing nothing the run would see)
        with isolated_rng():
            train_data, valid_data, test_data = loaders_at_fitted_sizes(config, train_data, valid_data, test_data)
    if not is_plugin_model(config["model"]):
        # thop profiling of an LLM forward is slow and meaningless for LoRA; keep it for baselines.
        transform = construct_transform(config)
        flops = get_flops(model, dataset, config["device"], logger, transform)
        logger.info(set_color("FLOPs", "blue") + f": {flops}")
    elif projection is not None:
        recheck_after_first_step(_time_one_step(model, train_data, config), projection, config)
    num_trainable = count_trainable_parameters(model)
    logger.info(set_color("Trainable parameters", "blue") + f": {num_trainable:,}")

    trainer_class = get_trainer(config["MODEL_TYPE"], config["model"])
    if not config["single_spec"]:
        trainer_class = distributed.distributed_trainer(trainer_class)  # DDP on CPU/gloo too; gathered metrics
    trainer = trainer_class(config, model)
    trainer.evaluator = RecordingEvaluator(config)
    if torch.device(config["device"]).type == "cuda":
        torch.cuda.reset_peak_memory_stats(config["device"])

    if config["resume"]:
        resume_training(trainer, config["resume"])  # exact resume of an interrupted run (plugin models)
    # The plugin trainer keeps the curve (a resumed run continues the interrupted run's); RecBole's has none.
    curve, progress = getattr(trainer, "learning_curve", []), distributed.show_progress(config) and show_progress_bars(config)
    start = time.perf_counter()
    if config["eval_checkpoint"]:
        # A trained checkpoint, evaluated as it is (e.g. with another score_aggregation): no training.
        model_file = config["eval_checkpoint"]
        best_valid_result = trainer.evaluate(valid_data, model_file=model_file, show_progress=progress)
        best_valid_score = best_valid_result[config["valid_metric"].lower()]
    else:
        model_file = None
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=saved, show_progress=progress,
            callback_fn=_learning_curve_recorder(trainer, test_data, curve) if config["learning_curve"] else None,
        )
    train_time = time.perf_counter() - start

    load_best_model = saved or model_file is not None
    fusion = bool(config["score_fusion"]) and is_plugin_model(config["model"]) and bool(valid_data)
    if config["score_fusion"] and not fusion:
        logger.warning("score_fusion: skipped (it needs a plugin LLM model and validation data to choose its weight).")
    if fusion:
        fusion_start = time.perf_counter()
        fusion_weight, valid_by_weight, fused_valid_result = choose_fusion_weight(
            trainer, valid_data, config["score_fusion_weights"], load_best_model, model_file, progress)
        fusion_time = time.perf_counter() - fusion_start
    # The plain test records the LLM's scores, which the fused test then replays: the LLM scores the test set once.
    test_replay = LLMScoreReplay() if fusion else None
    start = time.perf_counter()
    with scoring_with(model, None, test_replay) if fusion else nullcontext():
        test_result = trainer.evaluate(test_data, load_best_model=load_best_model, model_file=model_file,
                                       show_progress=progress)
    eval_time = time.perf_counter() - start
    test_per_user = per_user_metrics(config, trainer.evaluator.last_struct)
    if fusion:
        fusion_start = time.perf_counter()
        test_replay.rewind()
        with without_generation(trainer), scoring_with(model, fusion_weight, test_replay):
            fused_test_result = plain(trainer.evaluate(test_data, load_best_model=False, show_progress=progress))
        score_fusion = {
            "weight": fusion_weight,
            "valid_by_weight": valid_by_weight,
            "best_valid_result": plain(fused_valid_result),
            "test_result": fused_test_result,
            "test_per_user": per_user_metrics(config, trainer.evaluator.last_struct),
            "eval_time_s": fusion_time + time.perf_counter() - fusion_start,
        }
        logger.info(set_color("test result with SASRec fusion", "yellow") + f" (weight {fusion_weight:g}): {fused_test_result}")

    logger.debug("The running environment of this training is as follows:\n" + get_environment(config).draw())
    best_valid_result, test_result = plain(best_valid_result), plain(test_result)
    validated = best_valid_result if best_valid_result is not None else "none (no validation ran)"
    logger.info(set_color("best valid ", "yellow") + f": {validated}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")

    result = {
        "best_valid_score": plain(best_valid_score),
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "test_per_user": test_per_user,
        "num_trainable_parameters": num_trainable,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "peak_memory_gib": _peak_memory_gib(config["device"]),
        "device": device_description(config["device"]),
        "learning_curve": curve,
    }
    if fusion:
        result["score_fusion"] = score_fusion
    if not config["single_spec"]:
        torch.distributed.destroy_process_group()
    return result


def _learning_curve_recorder(trainer, test_data, curve: list):
    """``learning_curve: true``: after every validation, the test metrics of the current weights.

    For the curves of a report, not for model selection (that stays on validation). Evaluation draws no
    random numbers that training would see (fixed candidates, and the global streams are restored).
    """

    def record(epoch_idx, valid_score):
        with isolated_rng():
            test = plain(trainer.evaluate(test_data, load_best_model=False))
        point = {"epoch": epoch_idx + 1, "optimizer_steps": getattr(trainer, "global_step", None),
                 "valid_score": plain(valid_score), "test_result": test}
        curve.append(point)
        getLogger().info(set_color("learning curve", "blue") + f": {point}")

    return record


def _time_one_step(model, train_data, config) -> float:
    """Seconds of one training step on the first training micro-batch, from its timed forward pass (a backward
    pass costs about twice as much). The draws it makes are undone -- the global streams' and the train loader's
    own batch-order generator's -- so the run itself is unchanged."""
    with isolated_rng(train_data.generator), torch.no_grad():
        interaction = next(iter(train_data)).to(config["device"])
        start = time.perf_counter()
        model.calculate_loss(interaction)
        return 3 * (time.perf_counter() - start)


def _remove_run_handlers(handlers_before: set) -> None:
    # The run's log handlers go again, so that the next run in the same process (tests, leaderboards)
    # logs to its own file instead of the first run's.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers_before:
            handler.close()
            root.removeHandler(handler)
