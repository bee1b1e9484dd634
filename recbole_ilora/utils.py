"""Model and trainer lookup: plugin classes first, then RecBole's own (as RecBole-GNN does)."""

from __future__ import annotations

import importlib

from recbole.utils import get_model as get_recbole_model
from recbole.utils import get_trainer as get_recbole_trainer

PLUGIN_MODEL_PACKAGE = "recbole_ilora.model"


def get_model(model_name: str):
    """Return the model class called ``model_name``: a plugin model if one exists, else RecBole's."""
    module_path = f"{PLUGIN_MODEL_PACKAGE}.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is not None:
        return getattr(importlib.import_module(module_path), model_name)
    return get_recbole_model(model_name)


def get_trainer(model_type, model_name: str):
    """Return ``recbole_ilora.trainer.<Model>Trainer`` if it exists, else RecBole's choice."""
    trainer_module = importlib.import_module("recbole_ilora.trainer")
    trainer = getattr(trainer_module, f"{model_name}Trainer", None)
    return trainer if trainer is not None else get_recbole_trainer(model_type, model_name)


def is_plugin_model(model_name: str) -> bool:
    return importlib.util.find_spec(f"{PLUGIN_MODEL_PACKAGE}.{model_name.lower()}") is not None
