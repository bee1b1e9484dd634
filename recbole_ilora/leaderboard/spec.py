"""The grid YAML: its schema and validation, the cells it defines, and its tuning trials.

A grid file names ``models``, ``datasets`` and ``seeds`` and the settings every cell gets::

    models: [Pop, SASRec, LLaRA, iLoRA, iLoRA + listwise]
    datasets: [ml-100k]
    seeds: [2020, 2021, 2022]
    proposed: iLoRA                         # default: the last model listed
    baseline: LLaRA                         # default: none
    overrides: {epochs: 50}                 # every cell
    dataset_overrides: {ml-100k: {...}}     # cells of one dataset
    model_overrides: {iLoRA: {...}}         # cells of one model (and of its variants)
    variants:                               # rows that run a model with extra settings (an ablation)
      iLoRA + listwise: {model: iLoRA, overrides: {listwise_loss_weight: 1.0}}
    cell_overrides:                         # cells matching every key given (model/dataset/seed)
      - {model: iLoRA, dataset: ml-100k, overrides: {learning_rate: 1e-4}}
    output_dir: results/leaderboard         # results.jsonl, tables and the plot go here
    metrics: [HR@1, HR@5, NDCG@5, NDCG@10]  # table columns (RecBole's "hit" is shown as HR)
    significance_test: wilcoxon             # or ttest (paired t-test)
    tune: {...}                             # optional: see recbole_ilora.leaderboard.tuning

A cell's settings are merged in that order -- ``overrides`` < ``dataset_overrides`` <
``model_overrides`` < a variant's ``overrides`` < ``cell_overrides`` < the command line's ``--key=value``
-- and passed to :func:`recbole_ilora.quick_start.run_recbole_ilora` as its ``config_dict`` (so they also
win over ``--config_files`` and the ``properties/`` YAML files). The grid sets ``seed``; giving it
elsewhere is an error. ``proposed`` is the model the tables test against every other model and whose
relative improvement they report, over ``baseline`` and over the best classical (non-LLM) model.

A *variant* is a row of its own: its name is listed in ``models`` (and is what ``proposed``,
``baseline``, ``cell_overrides``, ``tune.space`` and the tables call it), its cells run the registered
``model`` it names with ``model_overrides`` of that model and then its own ``overrides``, and it counts as
an LLM row exactly when its model is one. Its settings hash covers its model, so editing a variant
reruns its cells.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml
from recbole.config import Config as RecBoleConfig

from recbole_ilora.leaderboard.store import config_hash, record_key
from recbole_ilora.leaderboard.tuning import TuneSpec, TuningResult, choose_trials
from recbole_ilora.outputs import default_output_root
from recbole_ilora.settings import SettingError, check_model_name, known_models
from recbole_ilora.utils import resolve_properties_path

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "results/leaderboard"
DEFAULT_METRICS = ("HR@1", "HR@5", "NDCG@5", "NDCG@10")
SIGNIFICANCE_TESTS = ("wilcoxon", "ttest")
REQUIRED_KEYS = frozenset({"models", "datasets", "seeds"})
GRID_KEYS = REQUIRED_KEYS | {
    "proposed",
    "baseline",
    "overrides",
    "model_overrides",
    "dataset_overrides",
    "cell_overrides",
    "output_dir",
    "metrics",
    "significance_test",
    "tune",
    "variants",
}
VARIANT_KEYS = frozenset({"model", "overrides"})
CELL_OVERRIDE_KEYS = frozenset({"model", "dataset", "seed", "overrides"})
TUNE_KEYS = frozenset({"models", "seeds", "space", "allow_unequal_budgets"})


class GridSpecError(ValueError):
    """The grid YAML is malformed (unknown key, wrong type, seed given as an override, unequal budgets, ...)."""


@dataclass
class Cell:
    """One run of the grid."""

    model: str
    dataset: str
    seed: int
    overrides: dict
    config_files: list[str]
    config_hash: str
    trial: dict | None = None  # the tuned settings of a tuning trial (or of a tuned model's final cell)
    awaiting_tuning: bool = False  # a tuned model's final cell before its trials have finished
    run_model: str = ""  # the registered model the cell runs: a variant's model, else (default) ``model``

    def __post_init__(self) -> None:
        self.run_model = self.run_model or self.model

    @property
    def key(self) -> tuple:
        """The cell's identity in the results file (:func:`~recbole_ilora.leaderboard.store.record_key`)."""
        return (self.model, self.dataset, self.seed, self.config_hash)

    def __str__(self) -> str:
        trial = "".join(f", {key}={value}" for key, value in (self.trial or {}).items())
        return f"{self.model} on {self.dataset} (seed {self.seed}{trial})"


@dataclass
class GridSpec:
    """A parsed grid file; see the module docstring for the meaning of each field."""

    models: list[str]
    datasets: list[str]
    seeds: list[int]
    overrides: dict = field(default_factory=dict)
    model_overrides: dict[str, dict] = field(default_factory=dict)
    dataset_overrides: dict[str, dict] = field(default_factory=dict)
    cell_overrides: list[dict] = field(default_factory=list)
    output_dir: str = DEFAULT_OUTPUT_DIR
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    significance_test: str = "wilcoxon"
    tune: TuneSpec | dict | None = None  # the YAML's mapping, normalised to a TuneSpec
    proposed: str | None = None  # None: the last model listed
    baseline: str | None = None
    variants: dict[str, dict] = field(default_factory=dict)  # row name -> {model, overrides}

    def __post_init__(self) -> None:
        self._validate_lists()
        self._validate_roles()
        self._validate_variants()
        self._validate_overrides()
        if self.tune is not None and not isinstance(self.tune, TuneSpec):
            self.tune = parse_tune(self.tune, self.models, self.seeds)

    def _validate_lists(self) -> None:
        for name in ("models", "datasets", "seeds", "metrics"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise GridSpecError(f"`{name}` must be a non-empty list, got {value!r}.")
            if len(set(map(str, value))) != len(value):
                raise GridSpecError(f"`{name}` lists an entry twice: {value!r}.")
        if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in self.seeds):
            raise GridSpecError(f"`seeds` must be integers, got {self.seeds!r}.")
        self.models = [str(model) for model in self.models]
        self.datasets = [str(dataset) for dataset in self.datasets]
        if self.significance_test not in SIGNIFICANCE_TESTS:
            raise GridSpecError(
                f"`significance_test` must be one of {SIGNIFICANCE_TESTS}, got {self.significance_test!r}."
            )
        for metric in self.metrics:
            metric_key(metric)  # raises on a malformed name

    def _validate_roles(self) -> None:
        if self.proposed is None:
            self.proposed = self.models[-1]  # papers list their own model last
        for role in ("proposed", "baseline"):
            name = getattr(self, role)
            if name is not None and str(name) not in self.models:
                raise GridSpecError(f"`{role}: {name}` is not one of the grid's models {self.models}.")
            setattr(self, role, None if name is None else str(name))
        if self.baseline is not None and self.baseline == self.proposed:
            raise GridSpecError(f"`baseline` and `proposed` are both {self.proposed}; name two different models.")

    def _validate_variants(self) -> None:
        if not isinstance(self.variants, dict):
            raise GridSpecError(f"`variants` must map row names to {{model: ..., overrides: {{...}}}}, got {self.variants!r}.")
        variants = {}
        for name, entry in self.variants.items():
            name, where = str(name), f"variants.{name}"
            if name not in self.models:
                raise GridSpecError(f"`{where}` is not listed in `models`; add {name!r} to `models` (its row) or remove it.")
            if name in known_models():
                raise GridSpecError(f"`{where}`: {name} is a registered model's name; give the variant a name of its "
                                    f"own, e.g. '{name} + <what it changes>'.")
            if not isinstance(entry, dict):
                raise GridSpecError(f"`{where}` must be a mapping {{model: <model>, overrides: {{...}}}}, got {entry!r}.")
            unknown = set(entry) - VARIANT_KEYS
            if unknown:
                raise GridSpecError(f"`{where}` has unknown keys {sorted(unknown)}; allowed: {sorted(VARIANT_KEYS)}.")
            model = entry.get("model")
            if model is None:
                raise GridSpecError(f"`{where}` lacks `model`: the registered model its cells run, e.g. "
                                    f"{{model: iLoRA, overrides: {{...}}}}.")
            model = str(model)
            if model in self.variants:
                raise GridSpecError(f"`{where}.model: {model}` is itself a variant; name the registered model it runs.")
            try:
                check_model_name(model, source=f"`{where}.model`")  # the lookup a run's Config does
            except SettingError as error:
                raise GridSpecError(str(error)) from None
            overrides = entry.get("overrides") or {}
            if not isinstance(overrides, dict):
                raise GridSpecError(f"`{where}.overrides` must be a mapping, got {overrides!r}.")
            _refuse_seed(overrides, f"{where}.overrides")
            variants[name] = {"model": model, "overrides": dict(overrides)}
        self.variants = variants
        for row in self.models:  # every other row runs the model it names: a typo stops here, not cell by cell
            if row not in variants:
                try:
                    check_model_name(row, source="`models`")
                except SettingError as error:
                    raise GridSpecError(f"{error} (A row that runs a model with other settings is declared in "
                                        f"`variants`.)") from None

    def base_model(self, row: str) -> str:
        """The registered model a row runs: a variant's ``model``, else the row itself."""
        variant = self.variants.get(row)
        return variant["model"] if variant else row

    def _validate_overrides(self) -> None:
        for name in ("overrides", "model_overrides", "dataset_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise GridSpecError(f"`{name}` must be a mapping, got {getattr(self, name)!r}.")
        _refuse_seed(self.overrides, "overrides")
        run_models = [*self.models, *(variant["model"] for variant in self.variants.values())]  # a variant's model's apply
        for group_name, known in (("model_overrides", run_models), ("dataset_overrides", self.datasets)):
            for key, values in getattr(self, group_name).items():
                if not isinstance(values, dict):
                    raise GridSpecError(f"`{group_name}.{key}` must be a mapping, got {values!r}.")
                _refuse_seed(values, f"{group_name}.{key}")
                if group_name == "model_overrides" and key in self.variants:
                    # A variant gets its model's model_overrides; two places for its own settings would be one too many.
                    raise GridSpecError(f"`model_overrides.{key}` names a variant; put its settings in "
                                        f"`variants.{key}.overrides`.")
                if key not in known:
                    logger.warning("%s names %r, which is not in the grid; its overrides are unused.", group_name, key)
        if not isinstance(self.cell_overrides, list):
            raise GridSpecError(f"`cell_overrides` must be a list of mappings, got {self.cell_overrides!r}.")
        for index, entry in enumerate(self.cell_overrides):
            if not isinstance(entry, dict) or not isinstance(entry.get("overrides"), dict):
                raise GridSpecError(
                    f"`cell_overrides[{index}]` must be a mapping with an `overrides` mapping, got {entry!r}."
                )
            unknown = set(entry) - CELL_OVERRIDE_KEYS
            if unknown:
                raise GridSpecError(
                    f"`cell_overrides[{index}]` has unknown keys {sorted(unknown)}; allowed: {sorted(CELL_OVERRIDE_KEYS)}."
                )
            _refuse_seed(entry["overrides"], f"cell_overrides[{index}].overrides")

    def results_dir(self, cli_overrides: dict | None = None) -> Path:
        """``output_dir`` under the runs' ``output_root`` (command line, then the grid's overrides, then the
        default ``outputs``), unless absolute: a grid's results sit with its runs' logs and checkpoints."""
        root = (cli_overrides or {}).get("output_root") or self.overrides.get("output_root") or default_output_root()
        return Path(root) / self.output_dir

    @property
    def tuned_models(self) -> list[str]:
        """The models with a tuning space, in grid order."""
        return self.tune.models if self.tune else []

    def cell_settings(self, model: str, dataset: str, seed: int) -> dict:
        """The grid's own settings for one cell (without the command line's), merged by precedence.

        ``model`` is the row: for a variant, its model's ``model_overrides`` and then its own overrides apply.
        """
        merged = dict(self.overrides)
        merged.update(self.dataset_overrides.get(dataset, {}))
        merged.update(self.model_overrides.get(self.base_model(model), {}))
        merged.update(self.variants.get(model, {}).get("overrides", {}))
        for entry in self.cell_overrides:
            wanted = {"model": model, "dataset": dataset, "seed": seed}
            if all(entry[key] == wanted[key] for key in ("model", "dataset", "seed") if key in entry):
                merged.update(entry["overrides"])
        return merged

    def _cell(self, model, dataset, seed, cli_overrides, config_files, trial=None) -> Cell:
        merged = self.cell_settings(model, dataset, seed)
        merged.update(trial or {})
        merged.update(cli_overrides)
        # A variant's hash covers the model it runs (plain models' hashes stay those of older results files).
        run_model = self.base_model(model)
        cell_hash = config_hash(merged, config_files, model=run_model if model in self.variants else None)
        return Cell(model=model, dataset=dataset, seed=seed, overrides=merged, config_files=config_files,
                    config_hash=cell_hash, trial=trial, run_model=run_model)

    def _check_cli(self, cli_overrides: dict | None) -> dict:
        cli_overrides = dict(cli_overrides or {})
        _refuse_seed(cli_overrides, "the command line")
        clash = sorted(set(cli_overrides) & self.tune.settings) if self.tune else []
        if clash:
            raise GridSpecError(f"{clash} are tuned by the grid's `tune.space`; do not also set them on the command line.")
        return cli_overrides

    def tuning_cells(self, cli_overrides: dict | None = None, config_files: Iterable[str] | None = None) -> list[Cell]:
        """One cell per (tuned model, dataset, tuning seed, trial of that model); empty without ``tune``."""
        cli_overrides, config_files = self._check_cli(cli_overrides), list(config_files or [])
        return [
            self._cell(model, dataset, seed, cli_overrides, config_files, trial)
            for dataset in self.datasets
            for model in self.tuned_models
            for seed in self.tune.seeds
            for trial in self.tune.trials(model)
        ]

    def cells(
        self,
        cli_overrides: dict | None = None,
        config_files: Iterable[str] | None = None,
        chosen: dict[tuple[str, str], dict] | None = None,
    ) -> list[Cell]:
        """Every final (model, dataset, seed) cell, datasets outermost then models then seeds.

        A tuned model's cells use ``chosen[(model, dataset)]`` (see :meth:`choose`); while that is not
        known yet they come back with ``awaiting_tuning=True`` and no hash.
        """
        cli_overrides, config_files = self._check_cli(cli_overrides), list(config_files or [])
        chosen = chosen or {}
        cells = []
        for dataset in self.datasets:
            for model in self.models:
                for seed in self.seeds:
                    if model in self.tuned_models and (model, dataset) not in chosen:
                        cells.append(Cell(model=model, dataset=dataset, seed=seed, overrides={},
                                          config_files=config_files, config_hash="", awaiting_tuning=True,
                                          run_model=self.base_model(model)))
                        continue
                    trial = chosen.get((model, dataset)) if model in self.tuned_models else None
                    cells.append(self._cell(model, dataset, seed, cli_overrides, config_files, trial))
        return cells

    def choose(self, records: list[dict], cli_overrides=None, config_files=None) -> TuningResult:
        """Per (tuned model, dataset): every trial's validation score and the chosen trial (best mean).

        See :func:`~recbole_ilora.leaderboard.tuning.choose_trials`. Models without a space (a grid
        with ``allow_unequal_budgets``) are listed with the validation score of their only settings, so
        the exported trials show every model.
        """
        if not self.tune:
            return TuningResult(chosen={}, trials=[], incomplete=[])
        cli_overrides, config_files = self._check_cli(cli_overrides), list(config_files or [])
        cells = [
            self._cell(model, dataset, seed, cli_overrides, config_files, trial)
            for dataset in self.datasets
            for model in self.models
            for seed in self.tune.seeds
            for trial in (self.tune.trials(model) or [None])
        ]
        return choose_trials(cells, records, len(self.tune.seeds))


def select_records(spec: GridSpec, records: list[dict], cli_overrides=None, config_files=None) -> tuple[list[dict], list[Cell]]:
    """The latest ``ok`` record of every final cell of the grid, and the cells that have none.

    Tuned models' cells are those of the chosen trial (:meth:`GridSpec.choose`); records of other
    configurations (other hashes, the trials not chosen) in the same file are ignored.
    """
    latest = {record_key(record): record for record in records if record.get("status") == "ok"}
    chosen = spec.choose(records, cli_overrides, config_files).chosen
    selected, missing = [], []
    for cell in spec.cells(cli_overrides, config_files, chosen):
        if cell.key in latest:
            selected.append(latest[cell.key])
        else:
            missing.append(cell)
    return selected, missing


def parse_tune(tune, models: list[str], seeds: list[int]) -> TuneSpec:
    """Validate a grid's ``tune`` mapping (see :mod:`~recbole_ilora.leaderboard.tuning`) into a :class:`TuneSpec`."""
    if not isinstance(tune, dict):
        raise GridSpecError(f"`tune` must be a mapping with `space` (and optionally models, seeds), got {tune!r}.")
    unknown = set(tune) - TUNE_KEYS
    if unknown:
        raise GridSpecError(f"`tune` has unknown keys {sorted(unknown)}; allowed: {sorted(TUNE_KEYS)}.")
    space = tune.get("space")
    if not isinstance(space, dict) or not space:
        raise GridSpecError(f"`tune.space` must map settings to lists of values, e.g. {{learning_rate: [4e-4, 8e-4]}}, "
                            f"or models to such mappings; got {space!r}.")
    if all(isinstance(values, dict) for values in space.values()):  # one space per model
        if "models" in tune:
            raise GridSpecError("`tune.models` only applies to a shared `tune.space`; per-model spaces name their models.")
        tuned = list(space)
        spaces = {model: _check_space(space[model], f"tune.space.{model}") for model in tuned}
    else:
        named = sorted(set(space) & set(models))
        if named:
            raise GridSpecError(f"`tune.space` mixes models {named} with settings; give either one space per model "
                                f"({{Model: {{setting: [values]}}}}) or one shared space ({{setting: [values]}}).")
        tuned = [str(model) for model in tune.get("models", models)]
        shared = _check_space(space, "tune.space")
        spaces = {model: shared for model in tuned}
    unknown_models = [model for model in tuned if model not in models]
    if unknown_models:
        raise GridSpecError(f"`tune` names {unknown_models}, which are not in the grid's models {models}.")
    tune_seeds = tune.get("seeds", seeds[:1])
    if not isinstance(tune_seeds, list) or not tune_seeds or any(seed not in seeds for seed in tune_seeds):
        raise GridSpecError(f"`tune.seeds` must be a non-empty subset of the grid's seeds; got {tune_seeds!r}.")
    allow = tune.get("allow_unequal_budgets", False)
    if not isinstance(allow, bool):
        raise GridSpecError(f"`tune.allow_unequal_budgets` must be true or false, got {allow!r}.")
    result = TuneSpec(seeds=list(tune_seeds), spaces={m: spaces[m] for m in models if m in spaces},
                      allow_unequal_budgets=allow)
    budgets = {model: result.budget(model) for model in models}
    if len(set(budgets.values())) > 1 and not allow:
        listed = ", ".join(f"{model}: {count}" + ("" if model in spaces else " (untuned)")
                           for model, count in budgets.items())
        raise GridSpecError(
            f"`tune` gives the models different numbers of trials ({listed}); a fair comparison tunes every model "
            "with the same budget. Give every model a space with the same number of combinations, or set "
            "`tune.allow_unequal_budgets: true` (and say why in the grid file)."
        )
    return result


def _check_space(space: dict, where: str) -> dict[str, list]:
    if not isinstance(space, dict) or not space:
        raise GridSpecError(f"`{where}` must map settings to lists of values, got {space!r}.")
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise GridSpecError(f"`{where}.{key}` must be a non-empty list of values, got {values!r}.")
        if key == "seed":
            raise GridSpecError(f"`{where}` cannot tune `seed`; the grid's `seeds` list decides it.")
    return dict(space)


def _refuse_seed(overrides: dict, where: str) -> None:
    if "seed" in overrides:
        raise GridSpecError(f"`seed` is set in {where}; the grid's `seeds` list decides every cell's seed.")


def load_grid_spec(path: str | os.PathLike) -> GridSpec:
    """Read a grid YAML file (with RecBole's YAML loader, so ``1e-4`` is a float as in RecBole configs).

    ``properties/leaderboard.yaml`` is found inside the installed package when not in the working directory.
    """
    path = resolve_properties_path(path)
    if not path.is_file():
        raise GridSpecError(f"Grid file {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        raw = yaml.load(handle, Loader=RecBoleConfig._build_yaml_loader(None))
    if not isinstance(raw, dict):
        raise GridSpecError(f"{path} must hold a YAML mapping with models, datasets and seeds.")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise GridSpecError(f"{path} has unknown keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}.")
    missing = REQUIRED_KEYS - set(raw)
    if missing:
        raise GridSpecError(f"{path} lacks {sorted(missing)}.")
    optional = {key: raw[key] for key in GRID_KEYS - REQUIRED_KEYS if raw.get(key) is not None}
    return GridSpec(models=raw["models"], datasets=raw["datasets"], seeds=raw["seeds"], **optional)


def metric_key(name: str) -> str:
    """RecBole's result key of a table metric: ``"HR@5"`` -> ``"hit@5"``, ``"NDCG@10"`` -> ``"ndcg@10"``."""
    if "@" not in name:
        raise GridSpecError(f"Metric {name!r} is not top-k; write it as NAME@K, e.g. HR@5 or NDCG@10.")
    base, k = name.split("@", 1)
    if not k.isdigit():
        raise GridSpecError(f"Metric {name!r} has a non-integer cut-off.")
    base = base.lower()
    return f"{'hit' if base == 'hr' else base}@{int(k)}"


def metric_label(key: str) -> str:
    """Display name of a RecBole result key: ``"hit@5"`` -> ``"HR@5"``, ``"ndcg@10"`` -> ``"NDCG@10"``."""
    base, k = key.split("@", 1)
    return f"{'HR' if base == 'hit' else base.upper()}@{k}"
