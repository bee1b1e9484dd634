"""A RecBole ``Config`` that knows the plugin's models and YAML defaults (the RecBole-GNN pattern).

Precedence, lowest to highest: RecBole's own defaults < ``properties/overall.yaml`` <
``properties/dataset/<dataset>.yaml`` < ``properties/model/<model and its base classes>.yaml`` < config files <
``config_dict``. Unlike RecBole's ``Config`` it does not read ``sys.argv`` itself: the command line
belongs to ``run_recbole_ilora.py``, which turns ``--key=value`` overrides into ``config_dict``
(so the plugin works inside pytest, notebooks and other programs' command lines).
"""

from __future__ import annotations

from recbole.config import Config as RecBoleConfig

from recbole_ilora.distributed.process_group import init_distributed_device
from recbole_ilora.utils import get_model, properties_dir


class Config(RecBoleConfig):
    def _load_cmd_line(self):
        return dict()

    def _get_model_and_dataset(self, model, dataset):
        if isinstance(model, str) or model is None:
            model = model if model is not None else self.external_config_dict.get("model")
            if model is None:
                raise KeyError("No model given: pass --model=NAME (e.g. SASRec, iLoRA).")
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError("No dataset given: pass --dataset=NAME (e.g. ml-100k).")
        return model, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        PROPERTIES_DIR = properties_dir()
        # A plugin model inherits the YAML defaults of its base classes (LLaRA and TALLRec use iLoRA.yaml).
        model_files = [PROPERTIES_DIR / "model" / f"{cls.__name__}.yaml" for cls in reversed(model_class.__mro__)]
        for path in (
            PROPERTIES_DIR / "overall.yaml",
            PROPERTIES_DIR / "dataset" / f"{dataset}.yaml",
            *dict.fromkeys(model_files + [PROPERTIES_DIR / "model" / f"{model}.yaml"]),
        ):
            if path.is_file():
                loaded = self._update_internal_config_dict(str(path)) or {}
                if path.parent.name == "dataset":
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]

    # --- distributed (recbole_ilora.distributed) -----------------------------------------------------
    def _init_device(self):
        # RecBole's own only knows NCCL on CUDA; with ``local_rank`` set (--nproc, torchrun) the plugin's
        # also runs gloo on CPU. Without it (one process) RecBole's is used unchanged.
        if "local_rank" not in self.final_config_dict:
            return super()._init_device()
        init_distributed_device(self.final_config_dict)
