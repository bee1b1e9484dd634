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

A cell's settings are merged in that order -- ``overrides`` < ``dataset_overrides`` <
``model_overrides`` < ``cell_overrides`` < the command line's ``--key=value`` -- and passed to
:func:`recbole_ilora.quick_start.run_recbole_ilora` as its ``config_dict`` (so they also win over
``--config_files`` and the ``properties/`` YAML files). The grid sets ``seed``; giving it elsewhere is
an error.

Every finished cell is appended to a JSON-lines file as soon as it finishes (flushed and fsync'ed,
one line per cell). A cell is identified by ``(model, dataset, seed, config_hash)``, where the hash
covers the cell's merged settings and the contents of the config files; rerunning the grid skips
the cells that already finished ``ok`` with the same hash, so an interrupted grid resumes where it
stopped and a changed setting re-runs exactly the cells it affects. Failed cells are recorded with
their error and re-run next time.
"""

from __future__ import annotations

import hashlib
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
    }
)
CELL_OVERRIDE_KEYS = frozenset({"model", "dataset", "seed", "overrides"})


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

    def __post_init__(self) -> None:
        self._validate()

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

    def cells(self, cli_overrides: dict | None = None, config_files: Iterable[str] | None = None) -> list["Cell"]:
        """Every (model, dataset, seed) cell, datasets outermost then models then seeds."""
        cli_overrides = dict(cli_overrides or {})
        _refuse_seed(cli_overrides, "the command line")
        config_files = list(config_files or [])
        cells = []
        for dataset in self.datasets:
            for model in self.models:
                for seed in self.seeds:
                    merged = self.cell_settings(model, dataset, seed)
                    merged.update(cli_overrides)
                    cells.append(
                        Cell(
                            model=model,
                            dataset=dataset,
                            seed=seed,
                            overrides=merged,
                            config_files=config_files,
                            config_hash=config_hash(merged, config_files),
                        )
                    )
        return cells

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

    @property
    def key(self) -> tuple:
        return (self.model, self.dataset, self.seed, self.config_hash)

    def __str__(self) -> str:
        return f"{self.model} on {self.dataset} (seed {self.seed})"


def record_key(record: dict) -> tuple:
    return (record["model"], record["dataset"], record["seed"], record["config_hash"])


class ResultsStore:
    """The grid's JSON-lines results file: one record per finished cell, appended atomically.

    Each record is written as one ``write`` of a complete line followed by ``flush`` and ``fsync``, so a
    crash or Ctrl-C loses at most the cell that was running. A last line cut short by a crash during the
    write is reported and ignored when reading (its cell is simply run again).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def load(self) -> list[dict]:
        """All readable records, in file order."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        for number, line in enumerate(lines, start=1):
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


def run_grid(
    spec: GridSpec,
    results_path: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files: Iterable[str] | None = None,
    saved: bool = True,
    runner: Runner = _default_runner,
) -> GridRun:
    """Run every cell of ``spec`` that has no ``ok`` record in the results file yet.

    Cells run one after another in this process; each record is appended as soon as its cell ends.
    A failing cell is logged with its traceback, recorded as failed, and the grid goes on; a summary
    of the failures is printed at the end.
    """
    store = ResultsStore(results_path or Path(spec.output_dir) / RESULTS_FILE_NAME)
    cells = spec.cells(cli_overrides, config_files)
    done = store.finished_ok()
    skipped = [cell for cell in cells if cell.key in done]
    pending = [cell for cell in cells if cell.key not in done]
    print(
        f"Leaderboard: {len(cells)} cells ({len(spec.models)} models x {len(spec.datasets)} datasets x "
        f"{len(spec.seeds)} seeds); {len(skipped)} already finished in {store.path}, {len(pending)} to run."
    )
    finished, failed = [], []
    progress = tqdm(total=len(cells), initial=len(skipped), desc="leaderboard", unit="cell", dynamic_ncols=True)
    try:
        for cell in pending:
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
    except KeyboardInterrupt:
        progress.close()
        print(
            f"\nInterrupted. {len(skipped) + len(finished)} finished cells are saved in {store.path}; "
            f"run the same command again to resume with the remaining cells."
        )
        raise
    progress.close()
    run = GridRun(store=store, cells=cells, skipped=skipped, finished=finished, failed=failed)
    print(failure_summary(run))
    return run


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
    """The latest ``ok`` record of every cell of the grid, and the cells that have none.

    Records of other configurations (other hashes) in the same file are ignored.
    """
    latest = {record_key(record): record for record in records if record.get("status") == "ok"}
    selected, missing = [], []
    for cell in spec.cells(cli_overrides, config_files):
        if cell.key in latest:
            selected.append(latest[cell.key])
        else:
            missing.append(cell)
    return selected, missing
