"""Leaderboard: run a grid of models x datasets x seeds and export one comparison table.

``python run_recbole_ilora.py --leaderboard properties/leaderboard.yaml`` runs every cell of the grid
(:mod:`~recbole_ilora.leaderboard.grid`), appending each result to ``<output_dir>/results.jsonl`` as it
finishes, and then writes ``leaderboard.{md,csv,tex,json}`` (:mod:`~recbole_ilora.leaderboard.tables`)
and ``leaderboard.png`` (:mod:`~recbole_ilora.leaderboard.plot`) beside it. Rerunning the command resumes
an interrupted grid; ``--export_only`` rebuilds the exports from the results file without running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from recbole_ilora.leaderboard.grid import (
    RESULTS_FILE_NAME,
    Cell,
    GridRun,
    GridSpec,
    GridSpecError,
    ResultsStore,
    config_hash,
    load_grid_spec,
    run_grid,
)
from recbole_ilora.leaderboard.significance import paired_test, pool_pairs
from recbole_ilora.leaderboard.tables import (
    Leaderboard,
    build_leaderboard,
    export_tables,
)


def export_leaderboard(
    spec: GridSpec,
    store: ResultsStore,
    output_dir: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files=None,
) -> dict[str, Path]:
    """Write the tables (md, csv, tex, json) and the plot (png) of ``spec``'s results in ``store``."""
    from recbole_ilora.leaderboard.plot import plot_leaderboard

    records = store.load()
    board = build_leaderboard(spec, records, cli_overrides, config_files)
    if board.summary.empty:
        other = len([r for r in records if r.get("status") == "ok"])
        raise RuntimeError(
            f"No finished run of this grid in {store.path} ({other} ok records of other configurations there). "
            "Run the grid first, or pass the same --key=value overrides and --config_files it was run with."
        )
    output_dir = Path(output_dir or spec.output_dir)
    paths = export_tables(board, output_dir)
    paths["png"] = plot_leaderboard(board, output_dir / "leaderboard.png")
    return paths


def run_leaderboard(
    grid_path: str | os.PathLike,
    results_path: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files=None,
    saved: bool = True,
    export_only: bool = False,
    runner=None,
    shard: str | None = None,
    run_id: str | None = None,
) -> dict:
    """Run (unless ``export_only``) and export the grid in ``grid_path``; used by ``run_recbole_ilora.py``.

    With ``shard`` (``"I/N"``) this process runs its share of the cells and exports nothing (the other
    shards may still be running): export with ``export_only`` once all have finished.
    Returns ``{"results": results file, "exports": {format: path}, "failed": [failed records]}``.
    """
    spec = load_grid_spec(grid_path)
    store = ResultsStore(results_path or Path(spec.output_dir) / RESULTS_FILE_NAME)
    failed = []
    if not export_only:
        kwargs = {"runner": runner} if runner is not None else {}
        run = run_grid(spec, store.path, cli_overrides, config_files, saved=saved, shard=shard, run_id=run_id,
                       **kwargs)
        failed = run.failed
        if shard is not None:
            print(f"Shard {shard} done. Once every shard has finished, write the tables with --export_only.")
            return {"results": store.path, "exports": {}, "failed": failed}
    exports = export_leaderboard(spec, store, Path(results_path).parent if results_path else None,
                                 cli_overrides, config_files)
    print("Leaderboard written:\n" + "\n".join(f"  {fmt:8s} {path}" for fmt, path in exports.items()))
    return {"results": store.path, "exports": exports, "failed": failed}


def run_leaderboard_jobs(
    grid_path: str | os.PathLike,
    jobs: int,
    argv: list[str],
    results_path: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files=None,
) -> dict:
    """Run ``argv`` (a ``--leaderboard`` command line) as ``jobs`` shard processes, then export.

    Each process gets ``--shard=I/jobs`` and writes its output to ``<output dir>/shard-I.log``. A job
    that fails does not stop the others; the exit codes are reported and the exports are written from
    whatever finished.
    """
    spec = load_grid_spec(grid_path)
    store = ResultsStore(results_path or Path(spec.output_dir) / RESULTS_FILE_NAME)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    base, skip_next = [], False
    for arg in argv:  # this command line minus --jobs (each child is one shard)
        if skip_next or arg.startswith("--jobs="):
            skip_next = False
            continue
        if arg == "--jobs":
            skip_next = True
            continue
        base.append(arg)
    run_id = uuid.uuid4().hex[:12]  # the shards of this run take free cells dynamically
    processes, logs = [], []
    for index in range(jobs):
        log_path = store.path.parent / f"shard-{index}.log"
        log = open(log_path, "w", encoding="utf-8")
        logs.append(log)
        command = [sys.executable, "-c", "from recbole_ilora.cli import main; main()", *base, f"--shard={index}/{jobs}",
                   f"--run_id={run_id}"]
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        print(f"shard {index}/{jobs}: pid {processes[-1].pid}, log {log_path}")
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    finally:
        for log in logs:
            log.close()
    failed_jobs = [index for index, code in enumerate(codes) if code != 0]
    if failed_jobs:
        print(f"Shards {failed_jobs} exited with errors (exit codes {[codes[i] for i in failed_jobs]}); see their logs.")
    exports = export_leaderboard(spec, store, Path(results_path).parent if results_path else None,
                                 cli_overrides, config_files)
    print("Leaderboard written:\n" + "\n".join(f"  {fmt:8s} {path}" for fmt, path in exports.items()))
    return {"results": store.path, "exports": exports, "failed_jobs": failed_jobs}


__all__ = [
    "Cell",
    "GridRun",
    "GridSpec",
    "GridSpecError",
    "Leaderboard",
    "ResultsStore",
    "build_leaderboard",
    "config_hash",
    "export_leaderboard",
    "export_tables",
    "load_grid_spec",
    "paired_test",
    "pool_pairs",
    "run_grid",
    "run_leaderboard",
    "run_leaderboard_jobs",
]
