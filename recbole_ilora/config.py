"""A RecBole ``Config`` that knows the plugin's models and YAML defaults (the RecBole-GNN pattern).

Precedence, lowest to highest: RecBole's own defaults < ``properties/overall.yaml`` <
``properties/model/<model and its base classes>.yaml`` < ``properties/dataset/<dataset>.yaml`` < config
files < ``config_dict``. Dataset files come after model files, as in RecBole, so that dataset-specific
settings (the prompt wording of a domain, history length) reach every model.

Dict-valued settings merge one level deep at every step instead of being replaced: ``eval_args:
{mode: full}`` changes the evaluation mode and keeps the split, order and grouping. (A nested value such
as ``eval_args.split`` is replaced whole: its single key names the split method.)

Values given from outside are checked once: a key no defaults file knows (a typo) and a value that
could not be read as the default's type (``epochs: abc``, ``topk: [1,5``) are refused with the fix.

Unlike RecBole's ``Config`` it does not read ``sys.argv`` itself: the command line belongs to
``run_recbole_ilora.py``, which turns ``--key=value`` overrides into ``config_dict`` (so the plugin
works inside pytest, notebooks and other programs' command lines).
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path

import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import argument_list

from recbole_ilora.batch_sizes import provisional_batch_sizes
from recbole_ilora.distributed.process_group import init_distributed_device
from recbole_ilora.outputs import OUTPUT_ROOT_ENV
from recbole_ilora.settings import ConfigError, SettingError, check_model_name, check_settings
from recbole_ilora.utils import get_model, is_plugin_model, properties_dir, resolve_properties_path

# Settings set by launchers and the runtime rather than by defaults files.
RUNTIME_KEYS = frozenset({
    "model", "dataset", "config_files", "local_rank", "world_size", "nproc", "offset", "ip", "port",
    "ddp_init_method", "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters", "single_spec", "device",
    "resume", "output_root",
})


def merge_settings(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``; where both values are dicts, the update merges into the base."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return merged


@functools.lru_cache(maxsize=1)
def known_settings() -> frozenset:
    """Every key of RecBole's and the plugin's defaults files, of any model or dataset."""
    import recbole

    keys = set(RUNTIME_KEYS)
    for names in vars(argument_list).values():
        if isinstance(names, list):
            keys.update(names)
    for root in (Path(recbole.__file__).parent / "properties", properties_dir()):
        for path in root.rglob("*.yaml"):
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.load(handle, Loader=yaml.FullLoader)
            if isinstance(loaded, dict) and path.name not in ("prompts.yaml", "leaderboard.yaml"):
                keys.update(loaded)
    return frozenset(keys)


class Config(RecBoleConfig):
    def _load_cmd_line(self):
        return dict()

    def _load_config_files(self, file_list):
        settings: dict = {}
        for file in map(resolve_properties_path, file_list or ()):
            if not os.path.isfile(file):
                raise ConfigError(f"Config file {file} (--config_files) does not exist.")
            try:
                with open(file, encoding="utf-8") as handle:
                    loaded = yaml.load(handle.read(), Loader=self.yaml_loader)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)  # one line: the problem and where, not PyYAML's excerpt
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                raise ConfigError(f"Config file {file} is not valid YAML: {problem}{where}.") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"Config file {file} must hold `key: value` settings, not a {type(loaded).__name__}.")
            self._source.update({key: f"config file {file}" for key in loaded or {}})
            settings = merge_settings(settings, loaded or {})
        return settings

    def _load_variable_config_dict(self, config_dict):
        self._source.update({key: f"--{key}" for key in config_dict or {}})
        return super()._load_variable_config_dict(config_dict)

    def _merge_external_config_dict(self):
        self.external_config_dict = merge_settings(self.file_config_dict, self.variable_config_dict)

    def _init_parameters_category(self):
        super()._init_parameters_category()
        self._source: dict[str, str] = {}  # where each external setting came from, for messages

    def _get_model_and_dataset(self, model, dataset):
        if isinstance(model, str) or model is None:
            model = model if model is not None else self.external_config_dict.get("model")
            if model is None:
                raise SettingError("No model given: pass --model=NAME (e.g. SASRec, iLoRA).")
            check_model_name(model)  # RecBole's lookup ends in an unrelated import error for unknown names
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise SettingError("No dataset given: pass --dataset=NAME (e.g. ml-100k).")
        return model, model_class, dataset

    def _update_internal_config_dict(self, file):
        with open(file, encoding="utf-8") as handle:
            loaded = yaml.load(handle.read(), Loader=self.yaml_loader)
        if loaded is not None:
            self.internal_config_dict = merge_settings(self.internal_config_dict, loaded)
        return loaded

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        root = properties_dir()
        # A plugin model inherits the YAML defaults of its base classes (LLaRA and TALLRec start from iLoRA.yaml).
        model_files = [root / "model" / f"{cls.__name__}.yaml" for cls in reversed(model_class.__mro__)]
        for path in (root / "overall.yaml", *dict.fromkeys(model_files + [root / "model" / f"{model}.yaml"]),
                     root / "dataset" / f"{dataset}.yaml"):
            if path.is_file():
                loaded = self._update_internal_config_dict(str(path)) or {}
                if path.parent.name == "dataset":
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
        if os.environ.get(OUTPUT_ROOT_ENV):  # a default only: settings files and the command line still win
            self.internal_config_dict["output_root"] = os.environ[OUTPUT_ROOT_ENV]

    def _get_final_config_dict(self):
        self._check_external_settings()
        final = merge_settings(self.internal_config_dict, self.external_config_dict)
        check_settings(final, self._source, self.internal_config_dict, self.external_config_dict)  # ranges and contradictions, before RecBole reads any of them
        return final

    def _check_external_settings(self) -> None:
        known = known_settings() | set(self.internal_config_dict)
        for key, value in self.external_config_dict.items():
            source = self._source.get(key, key)
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
                hint = f" Did you mean {' or '.join(close)}?" if close else " Check its spelling against the YAML files in properties/."
                raise ConfigError(f"Unknown setting {key!r} ({source}): no RecBole or recbole-ilora defaults file defines it.{hint}")
            default = self.internal_config_dict.get(key)
            if not isinstance(value, str) or default is None or isinstance(default, str):
                continue
            # RecBole reads "Hit" as [Hit] for list settings; a bracketed string is a literal that failed to parse.
            if isinstance(default, (bool, int, float, dict)) or value.strip()[:1] in ("[", "{", "("):
                kind = type(default).__name__
                raise ConfigError(
                    f"Setting {key!r} ({source}) is {value!r}, which cannot be read as a {kind} like its default "
                    f"{default!r}: give a Python/YAML literal, e.g. {key}={default!r}."
                )

    def _set_default_parameters(self):
        super()._set_default_parameters()  # joins data_path with the dataset name
        from recbole_ilora.data.columns import infer_columns

        infer_columns(self, needs_titles=is_plugin_model(self.model))  # timestamp and titles from the headers

    # --- distributed (recbole_ilora.distributed) -----------------------------------------------------
    def _init_device(self):
        # RecBole's own only knows NCCL on CUDA; with ``local_rank`` set (--nproc, torchrun) the plugin's
        # also runs gloo on CPU. Without it (one process) RecBole's is used unchanged.
        if "local_rank" not in self.final_config_dict:
            super()._init_device()
        else:
            init_distributed_device(self.final_config_dict)
        # Batch sizes given as auto: numbers for every reader from here on (final on a CPU; a GPU run fits them to
        # the device once its model is built, see recbole_ilora.batch_sizes).
        self.auto_batch_sizes = provisional_batch_sizes(self)

    def protocol(self) -> str:
        """One line saying how this run is evaluated, for the log."""
        args = self["eval_args"]
        split = ", ".join(f"{k} {v}" for k, v in args["split"].items())
        modes = args["mode"]
        mode = modes["test"] if modes["valid"] == modes["test"] else f"valid {modes['valid']}, test {modes['test']}"
        fixed = "candidates fixed per (seed, phase, user)" if self["fixed_eval_negatives"] else "candidates redrawn"
        return (
            f"split {split} by {args['order']}, grouped by {args['group_by']}; evaluation {mode}"
            f"{'' if 'full' in modes.values() else ' (' + fixed + ')'}; metrics {', '.join(self['metrics'])} @ "
            f"{self['topk']}; early stopping on {self['valid_metric']} (patience {self['stopping_step']}, at most "
            f"{self['epochs']} epochs)"
        )
