"""A trained model's checkpoint and the settings it was trained with: reading one, and evaluating it as trained.

A best-model checkpoint (RecBole's or :class:`~recbole_ilora.trainer.iLoRATrainer`'s ``.pth``) pickles the
run's ``Config``; the plugin's also store ``settings`` (:func:`run_settings`, plain values) and
``gate_encoder``, the frozen SASRec it was trained with. ``--eval_checkpoint`` evaluates a checkpoint under
the settings it was trained with (:func:`eval_checkpoint_config`): the command may change how it is
evaluated, not what was trained.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from recbole_ilora.config import RUNTIME_KEYS as CONFIG_RUNTIME_KEYS
from recbole_ilora.config import Config, ConfigError
from recbole_ilora.utils import NON_RESULT_KEYS, differing_settings

# Settings that describe the process a run happened in, not what it computes: not carried over.
RUNTIME_KEYS = frozenset({"model", "dataset", "device", "gpu_id", "use_gpu", "local_rank", "world_size", "nproc",
                          "offset", "ip", "port", "single_spec", "resume", "eval_checkpoint", "ddp_init_method",
                          "state"})

# Settings that change how a trained model is evaluated, not the model: an evaluation may set them anew.
EVALUATION_KEYS = frozenset({"score_aggregation", "ghost_token_threshold", "score_attention", "score_pack_tokens",
                             "eval_batch_size", "eval_generate", "generate_max_new_tokens", "metrics", "topk",
                             "valid_metric", "valid_metric_bigger", "metric_decimal_place", "compile", "data_path",
                             "score_fusion", "score_fusion_weights"})


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as given: missing, not a model checkpoint, or of other settings."""


def _json_value(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def run_settings(config) -> dict:
    """The settings a run was given (its config files and overrides; the defaults files supply the rest), but the
    process's own: what rebuilds its model and data."""
    return {key: value for key, value in config.external_config_dict.items()
            if key not in RUNTIME_KEYS and _json_value(value)}


def load_checkpoint_file(path, setting: str, missing_hint: str):
    """``torch.load`` of a checkpoint this machine's runs wrote (they pickle RecBole's Config: load only your own);
    one line when it is missing (``missing_hint`` says where to look) or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{setting}={path}: no such file. {missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ModuleNotFoundError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(f"{setting}={path} cannot be read as a PyTorch checkpoint ({type(error).__name__}: "
                              f"{first_line}).") from None


def read_model_checkpoint(path, setting: str = "eval_checkpoint") -> dict:
    """The best-model checkpoint at ``path`` (a dict with ``config`` and ``state_dict``), or one line saying why not."""
    path = Path(path)
    checkpoint = load_checkpoint_file(path, setting, "Give a .pth a training run saved (in its checkpoint_dir, default "
                                                     "outputs/saved/).")
    if isinstance(checkpoint, dict) and checkpoint.get("kind") == "resume":
        raise CheckpointError(f"{setting}={path} is a resume checkpoint; give the best-model checkpoint beside it "
                              f"({path.name.removesuffix('.resume')}), or continue training with --resume={path}.")
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise CheckpointError(f"{setting}={path} is not a model checkpoint of RecBole or recbole-ilora (no config and "
                              f"state_dict in it).")
    return checkpoint


def eval_checkpoint_config(config) -> Config:
    """The config that evaluates ``config["eval_checkpoint"]``: the settings its run was trained with, then the ones
    this command gives (which must agree with them but for :data:`EVALUATION_KEYS` and display settings), and its
    gate encoder. One line (:class:`CheckpointError`) when the checkpoint is of another model or the command
    contradicts it."""
    path = Path(config["eval_checkpoint"])
    checkpoint = read_model_checkpoint(path)
    trained = checkpoint["config"]
    if (trained["model"], trained["dataset"]) != (config["model"], config["dataset"]):
        raise CheckpointError(
            f"eval_checkpoint={path} holds a {trained['model']} model trained on {trained['dataset']}; this run is "
            f"{config['model']} on {config['dataset']}: give --model={trained['model']} --dataset={trained['dataset']}, "
            f"or a checkpoint of {config['model']}.")
    given = dict(config.external_config_dict)
    free = NON_RESULT_KEYS | EVALUATION_KEYS | RUNTIME_KEYS | CONFIG_RUNTIME_KEYS
    contradicted = {key for key in given if key not in free and config[key] != trained[key]}
    if contradicted:
        differing = differing_settings({key: trained[key] for key in contradicted},
                                       {key: config[key] for key in contradicted})
        raise CheckpointError(
            f"eval_checkpoint={path} was trained with other settings than this command gives: {differing}. Leave them "
            f"out (the checkpoint's are used); an evaluation may change only {', '.join(sorted(EVALUATION_KEYS))}.")
    saved = checkpoint.get("settings", run_settings(trained))
    settings = {**{key: value for key, value in saved.items() if key not in NON_RESULT_KEYS}, **given}
    gate_encoder = checkpoint.get("gate_encoder")
    if gate_encoder and Path(gate_encoder).is_file():
        settings["gate_checkpoint"] = gate_encoder  # the one it was trained with, not one pretrained anew
    return Config(model=config["model"], dataset=config["dataset"], config_dict=settings)
