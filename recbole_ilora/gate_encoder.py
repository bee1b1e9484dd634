"""The frozen SASRec that drives iLoRA's gate and behavioural tokens: where it is, and loading it.

iLoRA needs a conventional sequential recommender trained on the same data: its sequence
representation ``z`` feeds the gate, its item embeddings become behavioural tokens. With
``gate_checkpoint`` unset it lives under ``<checkpoint_dir>/gate_encoders/`` with a name that hashes
everything that defines it, the device it is pretrained on included (:func:`gate_encoder_path`); the pipeline
pretrains it there before the model is built (:mod:`recbole_ilora.pipeline`), and the next run with the same data,
settings and device reuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from recbole.model.sequential_recommender import SASRec
from recbole.utils import argument_list

from recbole_ilora.utils import device_description, fingerprint, isolated_rng, result_settings

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


def gate_run_settings(config) -> dict:
    """The settings of the gate encoder's own RecBole run: the data settings of ``config`` and ``gate_sasrec``."""
    settings = {key: config[key] for key in _DATA_KEYS if key in config}
    settings.update(config["gate_sasrec"] or {})
    return settings


def gate_encoder_path(config) -> Path:
    """Where the gate encoder of ``config`` is: ``gate_checkpoint`` if set, else its place in the cache."""
    if config["gate_checkpoint"]:
        return Path(config["gate_checkpoint"])
    # The device is part of what defines it: a SASRec pretrained on a CPU (or another GPU model) has other weights
    # than the one a GPU run would pretrain, and a cache shared between machines must not hand one to the other.
    digest = fingerprint({"dataset": config["dataset"], "device": device_description(config["device"]),
                          **result_settings(gate_run_settings(config))})
    return Path(config["checkpoint_dir"]) / "gate_encoders" / f"SASRec-{config['dataset']}-{digest}.pth"


class FrozenSASRec(SASRec):
    """RecBole's SASRec, frozen: it stays in eval mode when the model around it trains, since its dropout would
    otherwise perturb the gate input and the behavioural tokens of every training step."""

    def train(self, mode: bool = True):
        return super().train(False)


def load_gate_encoder(path: Path, dataset):
    """A :class:`FrozenSASRec` restored from ``path`` and checked against ``dataset``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No gate encoder at {path}. Point gate_checkpoint to a RecBole SASRec checkpoint (.pth) trained on this "
            f"dataset, or pretrain one first with recbole_ilora.pipeline.pretrain_gate_encoder(config) (the "
            f"run_recbole_ilora pipeline does so before it builds the model)."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # RecBole checkpoint: pickled Config
    if checkpoint["config"]["model"] != "SASRec":
        raise ValueError(f"gate_checkpoint {path} holds a {checkpoint['config']['model']}, not a SASRec.")
    expected = checkpoint.get("item_tokens_digest")
    if expected is not None and expected != item_tokens_digest(dataset):
        raise ValueError(
            f"The gate encoder {path} was trained on a different item id mapping than the dataset has now (other "
            f"filters or files?). Unset gate_checkpoint to pretrain a new one."
        )
    # Its random initialisation is overwritten by the checkpoint: it must not shift the run's random draws.
    with isolated_rng():
        model = FrozenSASRec(checkpoint["config"], dataset)
    model.load_state_dict(checkpoint["state_dict"])
    return model.requires_grad_(False).eval()
