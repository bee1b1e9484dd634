"""Building a model, with the steps that run before: pretraining iLoRA's frozen SASRec.

:func:`build_model` is what every entry point (the quick start, the analysis, the recommender, the
benchmarks) uses. :func:`pretrain_gate_encoder` trains RecBole's own ``SASRec`` with RecBole's own
``Trainer`` on the run's dataset (same filters and split, settings from ``gate_sasrec``) and saves it where
:func:`recbole_ilora.gate_encoder.gate_encoder_path` says; a cached one is reused as it is.
"""

from __future__ import annotations

from logging import getLogger
from pathlib import Path

import torch
from recbole.utils import init_seed

from recbole_ilora.config import Config
from recbole_ilora.gate_encoder import gate_encoder_path, gate_run_settings, item_tokens_digest
from recbole_ilora.outputs import details_to_log_file, show_progress_bars
from recbole_ilora.utils import atomic_path, isolated_rng


def build_model(config, dataset):
    """``config.model_class(config, dataset)`` after the steps it needs (iLoRA's: its frozen SASRec). The steps
    draw no random numbers the model would see."""
    model_class = config.model_class
    if getattr(model_class, "needs_gate_encoder", None) and model_class.needs_gate_encoder(config):
        pretrain_gate_encoder(config)
    return model_class(config, dataset)


def pretrain_gate_encoder(config) -> Path:
    """The gate encoder of ``config``: ``gate_checkpoint``, a cached one, or one pretrained now and cached."""
    path = gate_encoder_path(config)
    if config["gate_checkpoint"]:
        if not path.is_file():
            raise FileNotFoundError(
                f"gate_checkpoint {path} does not exist. Point it to a RecBole SASRec checkpoint (.pth) trained on "
                f"dataset {config['dataset']!r}, or unset it to pretrain one automatically."
            )
        return path
    if path.is_file():
        getLogger().info(f"Reusing the pretrained gate encoder {path}")
        return path
    # Pretraining happens only on a cache miss: it must not shift the random draws of the run that follows,
    # and it trains even when called under torch.no_grad() (evaluation scripts).
    with isolated_rng(), torch.enable_grad():
        return _pretrain(config["dataset"], gate_run_settings(config), path)


def _pretrain(dataset_name: str, settings: dict, path: Path) -> Path:
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    logger = getLogger()
    logger.info(f"Pretraining the gate encoder (RecBole SASRec) on {dataset_name}; it is saved to {path} and reused.")
    with details_to_log_file():  # RecBole's data statistics and per-epoch lines: the log file only
        sasrec_config = Config(model="SASRec", dataset=dataset_name, config_dict=dict(settings))
        # The data path arrives already joined with the dataset name; undo RecBole's second join.
        sasrec_config["data_path"] = settings["data_path"]
        init_seed(sasrec_config["seed"], sasrec_config["reproducibility"])
        dataset = create_dataset(sasrec_config)
        train_data, valid_data, _ = data_preparation(sasrec_config, dataset)
        init_seed(sasrec_config["seed"], sasrec_config["reproducibility"])
        model = SASRec(sasrec_config, train_data._dataset).to(sasrec_config["device"])

        class GateTrainer(Trainer):
            def _save_checkpoint(self, epoch, verbose=True, **kwargs):
                # It writes to the temporary file of atomic_path: not a name to show the user.
                super()._save_checkpoint(epoch, verbose=False, **kwargs)

        trainer = GateTrainer(sasrec_config, model)
        with atomic_path(path) as partial:  # parallel runs may pretrain the same encoder; an interrupt leaves nothing
            trainer.saved_model_file = str(partial)
            score, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress_bars(sasrec_config))
            checkpoint = torch.load(partial, map_location="cpu", weights_only=False)  # written just above
            checkpoint["item_tokens_digest"] = item_tokens_digest(dataset)
            torch.save(checkpoint, partial)
    logger.info(f"Gate encoder pretrained: best validation {sasrec_config['valid_metric']} {float(score):.4f} (its "
                f"epochs are in the log file)")
    return path
