"""The frozen SASRec that drives iLoRA's gate and behavioural tokens: pretrain once, reuse.

iLoRA needs a conventional sequential recommender trained on the same data: its sequence
representation ``z`` feeds the gate, its item embeddings become behavioural tokens. With
``gate_checkpoint`` unset, :func:`gate_encoder_checkpoint` trains RecBole's own ``SASRec`` with
RecBole's own ``Trainer`` (same dataset, same filters and split, settings from ``gate_sasrec``) and
saves it under ``<checkpoint_dir>/gate_encoders/`` with a name that hashes everything that defines it;
the next run with the same data and settings reuses the file instead of training again.
"""

from __future__ import annotations

from logging import getLogger
from pathlib import Path

import numpy as np
import torch
from recbole.utils import argument_list, init_seed

from recbole_ilora.utils import NON_RESULT_KEYS, atomic_path, fingerprint, isolated_rng

# Settings that define the data a gate encoder was trained on: RecBole's dataset arguments, the split
# and the seed. Everything else of the LLM run (learning rate, batch size, epochs) is not passed on.
_DATA_KEYS = tuple(argument_list.dataset_arguments) + (
    "eval_args", "repeatable", "metrics", "topk", "valid_metric", "valid_metric_bigger", "seed",
    "reproducibility", "data_path", "gpu_id", "use_gpu", "show_progress", "state", "checkpoint_dir",
    "worker",
)


def item_tokens_digest(dataset) -> str:
    """Fingerprint of the dataset's item id mapping: a gate encoder only fits the mapping it was trained on."""
    tokens = np.asarray(dataset.field2id_token[dataset.iid_field]).astype(str)
    return fingerprint("\x1f".join(tokens.tolist()), length=16)


def _gate_run_settings(config) -> dict:
    settings = {key: config[key] for key in _DATA_KEYS if key in config}
    settings.update(config["gate_sasrec"] or {})
    return settings


def gate_encoder_checkpoint(config) -> Path:
    """Path of the gate encoder for ``config``: ``gate_checkpoint`` if set, else a cached pretrained SASRec."""
    if config["gate_checkpoint"]:
        path = Path(config["gate_checkpoint"])
        if not path.is_file():
            raise FileNotFoundError(
                f"gate_checkpoint {path} does not exist. Point it to a RecBole SASRec checkpoint (.pth) trained "
                f"on dataset {config['dataset']!r}, or unset it to pretrain one automatically."
            )
        return path
    settings = _gate_run_settings(config)
    defining = {k: v for k, v in settings.items() if k not in NON_RESULT_KEYS}
    digest = fingerprint({"dataset": config["dataset"], **defining})
    path = Path(config["checkpoint_dir"]) / "gate_encoders" / f"SASRec-{config['dataset']}-{digest}.pth"
    if path.is_file():
        getLogger().info(f"Reusing the pretrained gate encoder {path}")
        return path
    # Pretraining happens only on a cache miss: it must not shift the random draws of the run that follows,
    # and it trains even when the model is built under torch.no_grad() (evaluation scripts).
    with isolated_rng(), torch.enable_grad():
        return _pretrain(config["dataset"], settings, path)


def _pretrain(dataset_name: str, settings: dict, path: Path) -> Path:
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    from recbole_ilora.config import Config

    logger = getLogger()
    logger.info(f"Pretraining the gate encoder (RecBole SASRec) on {dataset_name}; it is saved to {path} and reused.")
    sasrec_config = Config(model="SASRec", dataset=dataset_name, config_dict=dict(settings))
    # The data path arrives already joined with the dataset name; undo RecBole's second join.
    sasrec_config["data_path"] = settings["data_path"]
    init_seed(sasrec_config["seed"], sasrec_config["reproducibility"])
    dataset = create_dataset(sasrec_config)
    train_data, valid_data, _ = data_preparation(sasrec_config, dataset)
    init_seed(sasrec_config["seed"], sasrec_config["reproducibility"])
    model = SASRec(sasrec_config, train_data._dataset).to(sasrec_config["device"])
    trainer = Trainer(sasrec_config, model)
    with atomic_path(path) as partial:  # parallel runs may pretrain the same encoder
        trainer.saved_model_file = str(partial)
        trainer.fit(train_data, valid_data, saved=True, show_progress=sasrec_config["show_progress"])
        checkpoint = torch.load(partial, map_location="cpu", weights_only=False)  # written just above
        checkpoint["item_tokens_digest"] = item_tokens_digest(dataset)
        torch.save(checkpoint, partial)
    return path


def load_gate_encoder(config, dataset, path: Path):
    """A frozen RecBole ``SASRec`` in eval mode, restored from ``path`` and checked against ``dataset``."""
    from recbole.model.sequential_recommender import SASRec

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # RecBole checkpoint: pickled Config
    if checkpoint["config"]["model"] != "SASRec":
        raise ValueError(f"gate_checkpoint {path} holds a {checkpoint['config']['model']}, not a SASRec.")
    expected = checkpoint.get("item_tokens_digest")
    if expected is not None and expected != item_tokens_digest(dataset):
        raise ValueError(
            f"The gate encoder {path} was trained on a different item id mapping than dataset "
            f"{config['dataset']!r} has now (other filters or files?). Unset gate_checkpoint to pretrain a new one."
        )
    model = SASRec(checkpoint["config"], dataset)
    model.load_state_dict(checkpoint["state_dict"])
    model.requires_grad_(False)
    return model.eval()
