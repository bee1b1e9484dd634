"""Leaderboard grids: the grid YAML, one run per (model, dataset, seed) cell, and a resumable store.

A grid file names ``models``, ``datasets`` and ``seeds`` and the settings every cell gets::

    models: [Pop, SASRec, iLoRA]
    datasets: [ml-100k]
    seeds: [2020, 2021, 2022]
    overrides: {epochs: 50}                 # every cell
    dataset_overrides: {ml-100k: {...}}     # cells of one dataset
    model_overrides: {iLoRA: {...}}         # cells of one model
    cell_overrides:                         # cells matching every key given (model/dataset/seed)
      - {model: iLoRA, dataset: ml-100k, overrides: {learning_rate: 1e-4}}
    output_dir: results/leaderboard         # results.jsonl, tables and the plot go here
    metrics: [HR@1, HR@5, NDCG@5, NDCG@10]  # table columns (RecBole's "hit" is shown as HR)
    significance_test: wilcoxon             # or ttest (paired t-test)
    tune:                                   # optional: validation-only hyper-parameter selection
      models: [LLaRA, iLoRA]                # (default: every model)
      seeds: [2020]                         # seeds whose validation score decides (default: the first)
      space: {learning_rate: [4e-4, 8e-4, 1.6e-3]}

A cell's settings are merged in that order -- ``overrides`` < ``dataset_overrides`` <
``model_overrides`` < ``cell_overrides`` < the command line's ``--key=value`` -- and passed to
:func:`recbole_ilora.quick_start.run_recbole_ilora` as its ``config_dict`` (so they also win over
``--config_files`` and the ``properties/`` YAML files). The grid sets ``seed``; giving it elsewhere is
an error.

With ``tune``, every tuned model first runs one *trial* per combination of the ``space`` values on
each dataset and each tuning seed; per (model, dataset) the combination with the best mean validation
score (RecBole's ``valid_metric``, early-stopping checkpoint) wins, and every seed of that model on that
dataset then runs with it. Test results play no part in the choice. A trial with the chosen values *is*
that seed's final cell (same settings, same hash), so it is not run twice. Every model gets the same
number of trials, i.e. the same tuning budget.

Every finished cell is appended to a JSON-lines file as soon as it finishes (flushed and fsync'ed,
one line per cell). A cell is identified by ``(model, dataset, seed, config_hash)``, where the hash
covers the cell's merged settings and the contents of the config files; rerunning the grid skips
the cells that already finished ``ok`` with the same hash, so an interrupted grid resumes where it
stopped and a changed setting re-runs exactly the cells it affects. Failed cells are recorded with
their error and re-run next time.

Several processes can share one grid (``shard="I/N"``, ``--shard=I/N`` on the command line): process
``I`` of ``N`` runs cells ``I, I+N, I+2N, ...`` of each stage (those not finished yet) -- or, when the
shards share a ``run_id`` (``--jobs`` gives them one), whichever cell is free next --, all append to one results file under a file lock, and
the final cells wait until every trial of the tuning stage has a record.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import yaml
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "results/leaderboard"
RESULTS_FILE_NAME = "results.jsonl"
DEFAULT_METRICS = ("HR@1", "HR@5", "NDCG@5", "NDCG@10")
SIGNIFICANCE_TESTS = ("wilcoxon", "ttest")
# Settings that change what a run prints or where it saves checkpoints, not its results: they are left
# out of the config hash so that turning progress bars on does not re-run a finished grid.
NON_RESULT_KEYS = frozenset({"show_progress", "state", "checkpoint_dir"})
GRID_KEYS = frozenset(
    {
        "models",
        "datasets",
        "seeds",
        "overrides",
        "model_overrides",
        "dataset_overrides",
        "cell_overrides",
        "output_dir",
        "metrics",
        "significance_test",
        "tune",
    }
)
CELL_OVERRIDE_KEYS = frozenset({"model", "dataset", "seed", "overrides"})
TUNE_KEYS = frozenset({"models", "seeds", "space"})
SHARD_WAIT_S = 15.0  # how often a shard polls the results file for other shards' tuning trials


class GridSpecError(ValueError):
    """The grid YAML is malformed (unknown key, wrong type, seed given as an override, ...)."""


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
    tune: dict | None = None

    def __post_init__(self) -> None:
        self._validate()
        self._validate_tune()

    def _validate(self) -> None:
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
        for name in ("overrides", "model_overrides", "dataset_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise GridSpecError(f"`{name}` must be a mapping, got {getattr(self, name)!r}.")
        _refuse_seed(self.overrides, "overrides")
        for group_name, known in (("model_overrides", self.models), ("dataset_overrides", self.datasets)):
            for key, values in getattr(self, group_name).items():
                if not isinstance(values, dict):
                    raise GridSpecError(f"`{group_name}.{key}` must be a mapping, got {values!r}.")
                _refuse_seed(values, f"{group_name}.{key}")
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
        for metric in self.metrics:
            metric_key(metric)  # raises on a malformed name

    def _validate_tune(self) -> None:
        if self.tune is None:
            return
        if not isinstance(self.tune, dict):
            raise GridSpecError(f"`tune` must be a mapping with `space` (and optionally models, seeds), got {self.tune!r}.")
        unknown = set(self.tune) - TUNE_KEYS
        if unknown:
            raise GridSpecError(f"`tune` has unknown keys {sorted(unknown)}; allowed: {sorted(TUNE_KEYS)}.")
        space = self.tune.get("space")
        if not isinstance(space, dict) or not space:
            raise GridSpecError(f"`tune.space` must map settings to lists of values, e.g. "
                                f"{{learning_rate: [4e-4, 8e-4]}}; got {space!r}.")
        for key, values in space.items():
            if not isinstance(values, list) or not values:
                raise GridSpecError(f"`tune.space.{key}` must be a non-empty list of values, got {values!r}.")
            if key == "seed":
                raise GridSpecError("`tune.space` cannot tune `seed`; the grid's `seeds` list decides it.")
        models = self.tune.get("models", self.models)
        unknown_models = [model for model in models if model not in self.models]
        if unknown_models:
            raise GridSpecError(f"`tune.models` names {unknown_models}, which are not in the grid's models.")
        seeds = self.tune.get("seeds", self.seeds[:1])
        unknown_seeds = [seed for seed in seeds if seed not in self.seeds]
        if not seeds or unknown_seeds:
            raise GridSpecError(f"`tune.seeds` must be a non-empty subset of the grid's seeds; got {seeds!r}.")
        self.tune = {"models": [str(m) for m in models], "seeds": list(seeds), "space": dict(space)}

    @property
    def tuned_models(self) -> list[str]:
        return self.tune["models"] if self.tune else []

    def trials(self) -> list[dict]:
        """Every combination of the tuning space's values, in the order the YAML lists them."""
        if not self.tune:
            return []
        keys = list(self.tune["space"])
        return [dict(zip(keys, values)) for values in itertools.product(*(self.tune["space"][k] for k in keys))]

    def _cell(self, model, dataset, seed, cli_overrides, config_files, trial=None) -> "Cell":
        merged = self.cell_settings(model, dataset, seed)
        merged.update(trial or {})
        merged.update(cli_overrides)
        return Cell(model=model, dataset=dataset, seed=seed, overrides=merged, config_files=config_files,
                    config_hash=config_hash(merged, config_files), trial=trial)

    def _check_cli(self, cli_overrides: dict | None) -> dict:
        cli_overrides = dict(cli_overrides or {})
        _refuse_seed(cli_overrides, "the command line")
        clash = sorted(set(cli_overrides) & set(self.tune["space"])) if self.tune else []
        if clash:
            raise GridSpecError(f"{clash} are tuned by the grid's `tune.space`; do not also set them on the command line.")
        return cli_overrides

    def tuning_cells(self, cli_overrides: dict | None = None, config_files: Iterable[str] | None = None) -> list["Cell"]:
        """One cell per (tuned model, dataset, tuning seed, trial); empty without ``tune``."""
        cli_overrides, config_files = self._check_cli(cli_overrides), list(config_files or [])
        return [
            self._cell(model, dataset, seed, cli_overrides, config_files, trial)
            for dataset in self.datasets
            for model in self.tuned_models
            for seed in self.tune["seeds"]
            for trial in self.trials()
        ]

    def cells(
        self,
        cli_overrides: dict | None = None,
        config_files: Iterable[str] | None = None,
        chosen: dict[tuple[str, str], dict] | None = None,
    ) -> list["Cell"]:
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
                                          config_files=config_files, config_hash="", awaiting_tuning=True))
                        continue
                    trial = chosen.get((model, dataset)) if model in self.tuned_models else None
                    cells.append(self._cell(model, dataset, seed, cli_overrides, config_files, trial))
        return cells

    def choose(self, records: list[dict], cli_overrides=None, config_files=None) -> "TuningResult":
        """Per (tuned model, dataset): every trial's validation score and the chosen trial (best mean).

        A (model, dataset) gets a choice only when every one of its trials has an ``ok`` record; its
        trials are compared on ``best_valid_score`` averaged over the tuning seeds.
        """
        latest = {record_key(r): r for r in records if r.get("status") == "ok"}
        rows, chosen, incomplete = [], {}, []
        cells = self.tuning_cells(cli_overrides, config_files)
        for (model, dataset), group in itertools.groupby(cells, key=lambda cell: (cell.model, cell.dataset)):
            group = list(group)
            scores: dict[str, list] = {}
            bigger = True
            for cell in group:
                record = latest.get(cell.key)
                label = json.dumps(cell.trial, sort_keys=True)
                scores.setdefault(label, [])
                if record is not None and record.get("best_valid_score") is not None:
                    scores[label].append(float(record["best_valid_score"]))
                    bigger = record.get("valid_score_bigger", True)
            complete = all(len(values) == len(self.tune["seeds"]) for values in scores.values())
            means = {label: float(np.mean(values)) if values else float("nan") for label, values in scores.items()}
            best = None
            if complete:
                best = (max if bigger else min)(means, key=lambda label: means[label])  # first of equal scores
                chosen[(model, dataset)] = json.loads(best)
            else:
                incomplete.append((model, dataset))
            for label, mean in means.items():
                rows.append({"model": model, "dataset": dataset, **json.loads(label), "valid_score": mean,
                             "n_seeds": len(scores[label]), "chosen": label == best})
        return TuningResult(chosen=chosen, trials=rows, incomplete=incomplete)

    def cell_settings(self, model: str, dataset: str, seed: int) -> dict:
        """The grid's own settings for one cell (without the command line's), merged by precedence."""
        merged = dict(self.overrides)
        merged.update(self.dataset_overrides.get(dataset, {}))
        merged.update(self.model_overrides.get(model, {}))
        for entry in self.cell_overrides:
            wanted = {"model": model, "dataset": dataset, "seed": seed}
            if all(entry[key] == wanted[key] for key in ("model", "dataset", "seed") if key in entry):
                merged.update(entry["overrides"])
        return merged


@dataclass
class TuningResult:
    """What :meth:`GridSpec.choose` found: the chosen trial per (model, dataset), and every trial's score."""

    chosen: dict[tuple[str, str], dict]
    trials: list[dict]  # model, dataset, <tuned settings>, valid_score (mean over tuning seeds), n_seeds, chosen
    incomplete: list[tuple[str, str]]  # (model, dataset) pairs with trials still unfinished or failed


def _refuse_seed(overrides: dict, where: str) -> None:
    if "seed" in overrides:
        raise GridSpecError(f"`seed` is set in {where}; the grid's `seeds` list decides every cell's seed.")


def load_grid_spec(path: str | os.PathLike) -> GridSpec:
    """Read a grid YAML file (with RecBole's YAML loader, so ``1e-4`` is a float as in RecBole configs)."""
    from recbole.config import Config as RecBoleConfig

    with open(path, encoding="utf-8") as handle:
        raw = yaml.load(handle, Loader=RecBoleConfig._build_yaml_loader(None))
    if not isinstance(raw, dict):
        raise GridSpecError(f"{path} must hold a YAML mapping with models, datasets and seeds.")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise GridSpecError(f"{path} has unknown keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}.")
    missing = {"models", "datasets", "seeds"} - set(raw)
    if missing:
        raise GridSpecError(f"{path} lacks {sorted(missing)}.")
    optional = {key: raw[key] for key in GRID_KEYS - {"models", "datasets", "seeds"} if raw.get(key) is not None}
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


def config_hash(overrides: dict, config_files: Iterable[str] = ()) -> str:
    """A stable 16-hex-digit hash of a cell's merged settings (minus :data:`NON_RESULT_KEYS`).

    The contents of ``config_files`` are hashed too, so editing one re-runs the cells that use it.
    Settings in ``properties/*.yaml`` are not part of the hash: after changing one, delete the
    affected lines of the results file (or use a new ``output_dir``).
    """
    payload = {
        "overrides": {key: value for key, value in overrides.items() if key not in NON_RESULT_KEYS},
        "config_files": [_file_digest(path) for path in config_files],
    }
    text = json.dumps(payload, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_digest(path: str) -> list[str]:
    with open(path, "rb") as handle:
        return [str(path), hashlib.sha256(handle.read()).hexdigest()]


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

    @property
    def key(self) -> tuple:
        return (self.model, self.dataset, self.seed, self.config_hash)

    def __str__(self) -> str:
        trial = "".join(f", {key}={value}" for key, value in (self.trial or {}).items())
        return f"{self.model} on {self.dataset} (seed {self.seed}{trial})"


def record_key(record: dict) -> tuple:
    return (record["model"], record["dataset"], record["seed"], record["config_hash"])


class ResultsStore:
    """The grid's JSON-lines results file: one record per finished cell, appended atomically.

    Each record is written as one ``write`` of a complete line followed by ``flush`` and ``fsync``, so a
    crash or Ctrl-C loses at most the cell that was running. A last line cut short by a crash during the
    write is reported and ignored when reading (its cell is simply run again). Appends hold an exclusive
    ``flock`` on the file, so several grid processes (shards) can share it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def load(self) -> list[dict]:
        """All readable records, in file order."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)  # never read another shard's half-written line
            return self._parse(handle.read())

    def _parse(self, text: str) -> list[dict]:
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                logger.warning(
                    "Ignoring unreadable line %d of %s (%s): probably cut short by an interruption; "
                    "its cell will be run again.",
                    number,
                    self.path,
                    error,
                )
        return records

    def claim(self, cells: list["Cell"], run_id: str, shard: str) -> "Cell | None":
        """Take the first of ``cells`` that is neither finished nor claimed by a shard of run ``run_id``.

        Reading and appending the ``claimed`` record happen under one exclusive lock, so two shards
        never take the same cell; claims of other runs (e.g. one that was killed) do not count.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            taken = {
                record_key(r) for r in self._parse(handle.read())
                if r.get("status") == "ok" or (r.get("status") == "claimed" and r.get("run_id") == run_id)
            }
            for cell in cells:
                if cell.key not in taken:
                    claim = {"status": "claimed", "run_id": run_id, "shard": shard, "model": cell.model,
                             "dataset": cell.dataset, "seed": cell.seed, "config_hash": cell.config_hash,
                             "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    handle.write(json.dumps(claim) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    return cell
        return None

    def finished_ok(self) -> dict[tuple, dict]:
        """The latest ``ok`` record of every finished cell, by ``(model, dataset, seed, config_hash)``."""
        return {record_key(record): record for record in self.load() if record.get("status") == "ok"}


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


Runner = Callable[..., dict]


def _default_runner(**kwargs) -> dict:
    from recbole_ilora.quick_start import run_recbole_ilora

    return run_recbole_ilora(**kwargs)


def run_cell(cell: Cell, runner: Runner = _default_runner, saved: bool = True) -> dict:
    """Run one cell and return its record; an exception is caught and recorded as ``status: failed``.

    ``KeyboardInterrupt`` (and other ``BaseException``) is not caught: it stops the grid, and the cell
    is run again on the next invocation.
    """
    config_dict = dict(cell.overrides, seed=cell.seed)
    record = {
        "model": cell.model,
        "dataset": cell.dataset,
        "seed": cell.seed,
        "config_hash": cell.config_hash,
        "overrides": cell.overrides,
        "config_files": cell.config_files,
    }
    if cell.trial is not None:
        record["trial"] = cell.trial
    start = time.perf_counter()
    try:
        record["protocol"] = describe_protocol(cell, config_dict)
        result = runner(
            model=cell.model,
            dataset=cell.dataset,
            config_file_list=cell.config_files or None,
            config_dict=config_dict,
            saved=saved,
        )
        record.update(_result_fields(result))
        record["status"] = "ok"
    except Exception as error:  # a failed cell is recorded and the grid goes on (see run_grid)
        record.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            traceback="".join(traceback.format_exc(limit=-12)),
        )
    record["wall_time_s"] = time.perf_counter() - start
    record["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def describe_protocol(cell: Cell, config_dict: dict) -> dict:
    """The evaluation settings a cell runs with, read from its effective RecBole config."""
    from recbole_ilora.config import Config

    config = Config(
        model=cell.model,
        dataset=cell.dataset,
        config_file_list=cell.config_files or None,
        config_dict=dict(config_dict),
    )
    eval_args = config["eval_args"]
    mode = eval_args["mode"]
    return {
        "split": eval_args["split"],
        "order": eval_args["order"],
        "group_by": eval_args["group_by"],
        "test_mode": mode["test"] if isinstance(mode, dict) else mode,
        "valid_mode": mode["valid"] if isinstance(mode, dict) else mode,
        "valid_metric": config["valid_metric"],
    }


def _result_fields(result: dict) -> dict:
    return {
        "test_result": {key: float(value) for key, value in result["test_result"].items()},
        "best_valid_result": {key: float(value) for key, value in (result["best_valid_result"] or {}).items()},
        "best_valid_score": _optional_float(result["best_valid_score"]),
        "valid_score_bigger": bool(result.get("valid_score_bigger", True)),
        "test_per_user": {key: np.asarray(value, dtype=float).tolist() for key, value in result["test_per_user"].items()},
        "num_trainable_parameters": int(result["num_trainable_parameters"]),
        "train_time_s": float(result["train_time_s"]),
        "eval_time_s": float(result["eval_time_s"]),
        "peak_memory_gib": _optional_float(result["peak_memory_gib"]),
        "device": str(result["device"]),
    }


def _optional_float(value):
    return None if value is None else float(value)


@dataclass
class GridRun:
    """What :func:`run_grid` did: the cells it skipped, ran ok and saw fail (records), and the store."""

    store: ResultsStore
    cells: list[Cell]
    skipped: list[Cell]
    finished: list[dict]
    failed: list[dict]
    tuning: TuningResult | None = None


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``: this process runs cells ``1, 5, 9, ...`` of each stage (0-based)."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(part) for part in str(shard).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise GridSpecError(f"shard must be I/N with 0 <= I < N (e.g. 0/2 and 1/2 for two processes), got {shard!r}.")
    return index, count


def run_grid(
    spec: GridSpec,
    results_path: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files: Iterable[str] | None = None,
    saved: bool = True,
    runner: Runner = _default_runner,
    shard: str | None = None,
    run_id: str | None = None,
) -> GridRun:
    """Run every cell of ``spec`` that has no ``ok`` record in the results file yet.

    With ``tune``, the tuning trials run first, then the final cells with the chosen settings. Cells
    run one after another in this process; each record is appended as soon as its cell ends. A failing
    cell is logged with its traceback, recorded as failed, and the grid goes on; a summary of the
    failures is printed at the end. With ``shard="I/N"`` this process runs its share of the pending
    cells (see the module docstring); shards that share a ``run_id`` take the next free cell
    dynamically (:meth:`ResultsStore.claim`) instead, which balances cells of unequal cost.
    """
    index, count = parse_shard(shard)
    store = ResultsStore(results_path or Path(spec.output_dir) / RESULTS_FILE_NAME)
    trials = spec.tuning_cells(cli_overrides, config_files)
    done = store.finished_ok()
    pending_trials = [cell for cell in trials if cell.key not in done]
    finals = spec.cells(cli_overrides, config_files, spec.choose(store.load(), cli_overrides, config_files).chosen)
    total = len(trials) + len(finals) - (len(spec.tune["seeds"]) * len(spec.tuned_models) * len(spec.datasets) if trials else 0)
    share = "" if count == 1 else f" (shard {index}/{count})"
    print(
        f"Leaderboard{share}: {len(finals)} cells ({len(spec.models)} models x {len(spec.datasets)} datasets x "
        f"{len(spec.seeds)} seeds)" + (f" after {len(trials)} tuning trials of {', '.join(spec.tuned_models)} "
                                       f"over {spec.tune['space']}" if trials else "")
        + f"; {len(pending_trials)} trials and {sum(c.key not in done and not c.awaiting_tuning for c in finals)}"
        f" cells pending in {store.path}."
    )
    finished, failed, skipped = [], [], []
    progress = tqdm(total=total or None, desc="leaderboard", unit="cell", dynamic_ncols=True)

    counted: set[tuple] = set()  # a chosen trial is also its seed's final cell: count it once

    def run_stage(cells: list[Cell]) -> None:
        """Run this shard's pending cells of ``cells`` (a stage's full list; awaiting cells are skipped)."""
        done = store.finished_ok()
        ready = [cell for cell in cells if not cell.awaiting_tuning]
        pending = [cell for cell in ready if cell.key not in done]
        skipped.extend(cell for cell in ready if cell.key in done and cell.key not in counted)
        progress.update(sum(cell.key in done and cell.key not in counted for cell in ready))
        counted.update(cell.key for cell in ready if cell.key in done)
        if run_id:
            next_cell = lambda: store.claim(pending, run_id, f"{index}/{count}")  # noqa: E731
        else:
            # Shares by position in the stage's full cell list (awaiting cells included), not in what is
            # pending now: every shard computes the same assignment whenever it looks, so no cell runs twice.
            mine = iter([cell for cell in cells[index::count] if cell in pending])
            next_cell = lambda: next(mine, None)  # noqa: E731
        while True:
            cell = next_cell()
            if cell is None:
                break
            progress.set_postfix_str(str(cell))
            record = run_cell(cell, runner=runner, saved=saved)
            store.append(record)
            if record["status"] == "ok":
                finished.append(record)
                progress.write(f"ok      {cell}: {record['wall_time_s']:.1f}s")
            else:
                failed.append(record)
                logger.error("FAILED  %s: %s\n%s", cell, record["error"], record["traceback"])
                progress.write(f"FAILED  {cell}: {record['error']}")
            progress.update(1)
            counted.add(cell.key)

    if run_id and count == 1:
        raise GridSpecError("run_id only applies to shards (shard='I/N' with N > 1).")
    tuning = None
    try:
        run_stage(trials)
        tuning = spec.choose(store.load(), cli_overrides, config_files) if trials else None
        # Final cells that need no tuning result (baselines, tunings already decided) start at once ...
        run_stage(spec.cells(cli_overrides, config_files, tuning.chosen if tuning else None))
        if trials and count > 1:
            # ... the others once every trial has a record, some of them run by other shards.
            _wait_for_records(store, trials, progress)
            tuning = spec.choose(store.load(), cli_overrides, config_files)
            run_stage(spec.cells(cli_overrides, config_files, tuning.chosen))
        if tuning:
            for (model, dataset), trial in tuning.chosen.items():
                progress.write(f"tuned   {model} on {dataset}: {trial} (best validation score)")
            for model, dataset in tuning.incomplete:
                progress.write(f"UNTUNED {model} on {dataset}: a trial failed; its final cells are not run.")
        finals = spec.cells(cli_overrides, config_files, tuning.chosen if tuning else None)
    except KeyboardInterrupt:
        progress.close()
        print(
            f"\nInterrupted. {len(skipped) + len(finished)} finished cells are saved in {store.path}; "
            f"run the same command again to resume with the remaining cells."
        )
        raise
    progress.close()
    run = GridRun(store=store, cells=finals, skipped=skipped, finished=finished, failed=failed, tuning=tuning)
    print(failure_summary(run))
    return run


def _wait_for_records(store: ResultsStore, cells: list[Cell], progress) -> None:
    """Block until every cell has a record (ok or failed), written by this or another shard."""
    wanted = {cell.key for cell in cells}
    announced = False
    while True:
        have = {record_key(r) for r in store.load() if r.get("status") in ("ok", "failed")}
        missing = wanted - have
        if not missing:
            return
        if not announced:
            progress.write(f"waiting for {len(missing)} tuning trials of other shards ...")
            announced = True
        time.sleep(SHARD_WAIT_S)


def failure_summary(run: GridRun) -> str:
    """A short report of the run, listing every failed cell with its error."""
    lines = [
        f"Leaderboard run: {len(run.finished)} cells ran ok, {len(run.failed)} failed, "
        f"{len(run.skipped)} skipped (already finished)."
    ]
    if run.failed:
        lines.append("FAILED cells (see the tracebacks above and in the results file; rerun to retry them):")
        lines += [f"  - {r['model']} on {r['dataset']} (seed {r['seed']}): {r['error']}" for r in run.failed]
    return "\n".join(lines)


def select_records(spec: GridSpec, records: list[dict], cli_overrides=None, config_files=None) -> tuple[list[dict], list[Cell]]:
    """The latest ``ok`` record of every final cell of the grid, and the cells that have none.

    Tuned models' cells are those of the chosen trial (:meth:`GridSpec.choose`); records of other
    configurations (other hashes, the trials not chosen) in the same file are ignored.
    """
    latest = {record_key(record): record for record in records if record.get("status") == "ok"}
    chosen = spec.choose(records, cli_overrides, config_files).chosen if spec.tune else {}
    selected, missing = [], []
    for cell in spec.cells(cli_overrides, config_files, chosen):
        if cell.key in latest:
            selected.append(latest[cell.key])
        else:
            missing.append(cell)
    return selected, missing
