"""Running a grid: one cell at a time, tuning trials before final cells, shards, progress, resuming.

Every finished cell is appended to the results file (:mod:`~recbole_ilora.leaderboard.store`) as soon as
it finishes; rerunning the grid skips the cells that already finished ``ok`` with the same settings
hash, so an interrupted grid resumes where it stopped and a changed setting re-runs exactly the cells
it affects. Failed cells are recorded with their error and re-run next time.

Several processes can share one grid (``shard="I/N"``, ``--shard=I/N`` on the command line): process
``I`` of ``N`` runs cells ``I, I+N, I+2N, ...`` of each stage (those not finished yet) -- or, when the
shards share a ``run_id`` (``--jobs`` gives them one), whichever cell is free next --, all append to
one results file under a file lock, and the final cells wait until every trial of the tuning stage
has a record.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from recbole_ilora.config import Config
from recbole_ilora.leaderboard.exports import export_leaderboard
from recbole_ilora.leaderboard.spec import Cell, GridSpec, GridSpecError, load_grid_spec
from recbole_ilora.leaderboard.store import (
    RESULTS_FILE_NAME,
    ResultsStore,
    record_key,
    utc_timestamp,
)
from recbole_ilora.leaderboard.tuning import TuningResult
from recbole_ilora.overrides import parse_overrides
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.utils import release_device_memory

logger = logging.getLogger(__name__)

SHARD_WAIT_S = 15.0  # how often a shard polls the results file for other shards' tuning trials

Runner = Callable[..., dict]  # called like run_recbole_ilora(model=, dataset=, config_file_list=, config_dict=, saved=)


def run_cell(cell: Cell, runner: Runner = run_recbole_ilora, saved: bool = True) -> dict:
    """Run one cell and return its record; an exception is caught and recorded as ``status: failed``.

    The record's ``model`` is the cell's row; a variant's record adds the ``run_model`` it ran.

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
        "command": cell_command(cell),
    }
    if cell.run_model != cell.model:  # variants only: plain models' records stay as older results files have them
        record["run_model"] = cell.run_model
    if cell.trial is not None:
        record["trial"] = cell.trial
    start = time.perf_counter()
    try:
        record["protocol"] = describe_protocol(cell, config_dict)
        result = runner(
            model=cell.run_model,
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
    finally:
        release_device_memory()
    record["wall_time_s"] = time.perf_counter() - start
    record["timestamp"] = utc_timestamp()
    return record


def cell_command(cell: Cell) -> str:
    """The single-run command line that reruns ``cell`` outside the grid (same model, settings and seed)."""
    arguments = [f"--model={cell.run_model}", f"--dataset={cell.dataset}"]
    if cell.config_files:
        arguments.append(f"--config_files={' '.join(cell.config_files)}")
    arguments += [f"--{key}={command_line_value(value)}" for key, value in dict(cell.overrides, seed=cell.seed).items()]
    return " ".join(["python", "run_recbole_ilora.py", *map(shell_quoted, arguments)])


def shell_quoted(argument: str) -> str:
    """``argument`` quoted for a POSIX shell, in double quotes where that is safe (Python literals hold single ones)."""
    quoted = shlex.quote(argument)
    if quoted == argument or any(char in argument for char in '"$`\\!'):
        return quoted
    return f'"{argument}"'


def command_line_value(value) -> str:
    """``value`` as the command line reads it back (RecBole's rule: a Python literal, else the text itself): a string
    as it is where that reads back as the same string (``WARNING``, ``auto``), else its repr (``'1e-3'``)."""
    if isinstance(value, str) and parse_overrides([f"--value={value}"])["value"] == value:
        return value
    return repr(value)


def describe_protocol(cell: Cell, config_dict: dict) -> dict:
    """The evaluation settings a cell runs with, read from its effective RecBole config."""
    config = Config(
        model=cell.run_model,
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
    fields = {
        **_metric_fields(result),
        "best_valid_score": _optional_float(result["best_valid_score"]),
        "valid_score_bigger": bool(result.get("valid_score_bigger", True)),
        "num_trainable_parameters": int(result["num_trainable_parameters"]),
        "train_time_s": float(result["train_time_s"]),
        "eval_time_s": float(result["eval_time_s"]),
        "peak_memory_gib": _optional_float(result["peak_memory_gib"]),
        "device": str(result["device"]),
    }
    curve = result.get("learning_curve")
    if curve:  # learning_curve: true (plugin models): the test metrics after every validation
        fields["learning_curve"] = [
            {
                "epoch": int(point["epoch"]),
                "optimizer_steps": None if point.get("optimizer_steps") is None else int(point["optimizer_steps"]),
                "valid_score": _optional_float(point.get("valid_score")),
                "test_result": {key: float(value) for key, value in (point.get("test_result") or {}).items()},
            }
            for point in curve
        ]
    fusion = result.get("score_fusion")
    if fusion:  # score_fusion runs: the fused results, a derived row of the table ("<model> + SASRec fusion")
        fields["score_fusion"] = {
            "weight": float(fusion["weight"]),
            "valid_by_weight": [[float(weight), float(value)] for weight, value in fusion["valid_by_weight"].items()],
            **_metric_fields(fusion),
            "eval_time_s": float(fusion["eval_time_s"]),
        }
    return fields


def _metric_fields(result: dict) -> dict:
    """Test and validation metrics and the per-user test vectors of a result (or of its score_fusion), as JSON."""
    return {
        "test_result": {key: float(value) for key, value in result["test_result"].items()},
        "best_valid_result": {key: float(value) for key, value in (result["best_valid_result"] or {}).items()},
        "test_per_user": {key: np.asarray(value, dtype=float).tolist() for key, value in result["test_per_user"].items()},
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
    runner: Runner = run_recbole_ilora,
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
    store = ResultsStore(results_path or spec.results_dir(cli_overrides) / RESULTS_FILE_NAME)
    trials = spec.tuning_cells(cli_overrides, config_files)
    done = store.finished_ok()
    pending_trials = [cell for cell in trials if cell.key not in done]
    finals = spec.cells(cli_overrides, config_files, spec.choose(store.load(), cli_overrides, config_files).chosen)
    total = len(trials) + len(finals) - (len(spec.tune.seeds) * len(spec.tuned_models) * len(spec.datasets) if trials else 0)
    share = "" if count == 1 else f" (shard {index}/{count})"
    print(
        f"Leaderboard{share}: {len(finals)} cells ({len(spec.models)} models x {len(spec.datasets)} datasets x "
        f"{len(spec.seeds)} seeds)" + (f" after {len(trials)} tuning trials of {spec.tune.describe()}" if trials else "")
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
        pending = {cell.key: cell for cell in ready if cell.key not in done}
        skipped.extend(cell for cell in ready if cell.key in done and cell.key not in counted)
        progress.update(sum(cell.key in done and cell.key not in counted for cell in ready))
        counted.update(cell.key for cell in ready if cell.key in done)
        if run_id:
            def next_cell():
                key = store.claim(list(pending), run_id, f"{index}/{count}")
                return None if key is None else pending[key]
        else:
            # Shares by position in the stage's full cell list (awaiting cells included), not in what is
            # pending now: every shard computes the same assignment whenever it looks, so no cell runs twice.
            mine = iter([cell for cell in cells[index::count] if cell.key in pending])

            def next_cell():
                return next(mine, None)
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
        # Final cells that need no tuning result (untuned models, tunings already decided) start at once ...
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


def run_leaderboard(
    grid_path: str | os.PathLike,
    results_path: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files=None,
    saved: bool = True,
    export_only: bool = False,
    runner: Runner = run_recbole_ilora,
    shard: str | None = None,
    run_id: str | None = None,
) -> dict:
    """Run (unless ``export_only``) and export the grid in ``grid_path``; used by ``run_recbole_ilora.py``.

    With ``shard`` (``"I/N"``) this process runs its share of the cells and exports nothing (the other
    shards may still be running): export with ``export_only`` once all have finished.
    Returns ``{"results": results file, "exports": {format: path}, "failed": [failed records]}``.
    """
    spec = load_grid_spec(grid_path)
    store = ResultsStore(results_path or spec.results_dir(cli_overrides) / RESULTS_FILE_NAME)
    failed = []
    if not export_only:
        run = run_grid(spec, store.path, cli_overrides, config_files, saved=saved, runner=runner, shard=shard,
                       run_id=run_id)
        failed = run.failed
        if shard is not None:
            print(f"Shard {shard} done. Once every shard has finished, write the tables with --export_only.")
            return {"results": store.path, "exports": {}, "failed": failed}
    exports = export_leaderboard(spec, store, Path(results_path).parent if results_path else None,
                                 cli_overrides, config_files)
    return {"results": store.path, "exports": exports, "failed": failed}
