"""Rebuild a trained plugin model, its dataset and its dataloaders from an ``iLoRATrainer`` checkpoint.

A checkpoint holds the run's RecBole ``Config`` and only the trainable tensors (LoRA experts, gate,
projector). The frozen parts are rebuilt as training built them: the LLM from ``llm_path`` (the tiny
test LLM from the global RNG, which :func:`build_model` seeds as ``run_recbole_ilora`` does), the gate
encoder from its cache under ``checkpoint_dir`` (pretrained again, with a log line, if the cache is gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora.config import Config
from recbole_ilora.distributed import LAUNCH_KEYS
from recbole_ilora.evaluation import prepare_eval_loaders
from recbole_ilora.outputs import resolve_checkpoint_dir
from recbole_ilora.trainer import iLoRATrainer
from recbole_ilora import pipeline
from recbole_ilora.utils import NON_RESULT_KEYS, is_plugin_model

# Analysis defaults, under the user's --key=value overrides: the same evaluation negatives for every model
# (drawn per (seed, user), not from the global stream), no generation protocol, no compilation.
ANALYSIS_SETTINGS = {"fixed_eval_negatives": True, "eval_generate": False, "compile": False}

# Settings of a multi-process training run that do not apply to a single-process analysis.
_PROCESS_KEYS = ("local_rank", "resume", "eval_checkpoint") + LAUNCH_KEYS  # files of the run, maybe gone now


@dataclass
class TrainedRun:
    """One checkpoint: where it came from, its rebuilt config, and the trainable tensors to load."""

    path: Path
    config: Config
    state_dict: dict

    @property
    def model_name(self) -> str:
        return self.config["model"]


def load_run(path: str | Path, overrides: dict | None = None) -> TrainedRun:
    """Read ``path`` and rebuild its config: the run's own settings, then ANALYSIS_SETTINGS, then ``overrides``.

    The config is built anew (not unpickled as is) so that device settings follow this machine and
    ``--key=value`` overrides are typed and merged by RecBole's rules.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist: pass a .pth file written by a plugin model's training run."
        )
    checkpoint = iLoRATrainer.load_checkpoint(str(path))
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a training checkpoint of recbole_ilora (expected keys config and state_dict, "
            f"found {found})."
        )
    saved = checkpoint["config"]
    if not is_plugin_model(saved["model"]):
        raise ValueError(f"{path} holds a {saved['model']} checkpoint; the analysis needs iLoRA, LLaRA or TALLRec.")
    settings = {k: v for k, v in saved.external_config_dict.items() if k not in _PROCESS_KEYS}
    _warn_about_changed_settings(path, saved, overrides or {})
    config_dict = {**settings, **ANALYSIS_SETTINGS, **(overrides or {})}
    config = Config(model=saved["model"], dataset=saved["dataset"], config_dict=config_dict)
    resolve_checkpoint_dir(config)  # where the run cached its gate encoder, as quick_start resolved it
    return TrainedRun(path, config, checkpoint["state_dict"])


def _warn_about_changed_settings(path: Path, saved, overrides: dict) -> None:
    # Device, paths, batch sizes of evaluation and display are fine to change; anything else the model was
    # trained or its gate encoder cached under (metrics and topk included) makes the analysis describe
    # another setup.
    harmless = NON_RESULT_KEYS | set(ANALYSIS_SETTINGS) | {"data_path", "eval_batch_size"}
    changed = {key: value for key, value in overrides.items() if key not in harmless and saved[key] != value}
    if changed:
        getLogger().warning(
            f"Overrides change settings {path.name} was trained with: "
            + ", ".join(f"{key}: {saved[key]!r} -> {value!r}" for key, value in changed.items())
            + ". Data settings, metrics and topk also select the cached gate encoder (a new one is pretrained if "
            "none matches)."
        )


def data_settings(config) -> dict:
    """What defines the data and its split: RecBole's dataset arguments, ``eval_args``, name and path."""
    keys = list(config.parameters["Dataset"]) + ["eval_args", "dataset", "data_path"]
    return {key: config[key] for key in keys}


def check_same_data(reference: TrainedRun, other: TrainedRun) -> None:
    """The analysis clusters users once and compares models on them: both runs must share their data."""
    mine, theirs = data_settings(reference.config), data_settings(other.config)
    differing = sorted(key for key in mine if mine[key] != theirs.get(key))
    if differing:
        details = "; ".join(f"{key}: {mine[key]!r} vs {theirs.get(key)!r}" for key in differing[:5])
        raise ValueError(
            f"{reference.path} and {other.path} were trained on different data ({len(differing)} setting(s) differ: "
            f"{details}). Compare checkpoints of one dataset and split."
        )


def build_data(config):
    """RecBole's dataset and train/valid/test loaders, as ``run_recbole_ilora`` builds them."""
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    prepare_eval_loaders(config, valid_data, test_data)
    return dataset, train_data, valid_data, test_data


def build_model(run: TrainedRun, train_data) -> torch.nn.Module:
    """The model of ``run`` on ``train_data``'s dataset with the checkpoint's trainable tensors, in eval mode."""
    config = run.config
    init_seed(config["seed"], config["reproducibility"])  # training's seed for the (tiny, random) frozen LLM
    model = pipeline.build_model(config, train_data._dataset)
    model.load_trainable_state_dict(run.state_dict)
    return model.to(config["device"]).eval()


def run_label(run: TrainedRun, taken: set[str]) -> str:
    """The model's name, made unique among ``taken`` (two iLoRA checkpoints: ``iLoRA``, ``iLoRA#2``)."""
    label, index = run.model_name, 2
    while label in taken:
        label, index = f"{run.model_name}#{index}", index + 1
    return label
