"""Leaderboard: run a grid of models x datasets x seeds and export one comparison table.

``python run_recbole_ilora.py --leaderboard properties/leaderboard.yaml`` runs every cell of the grid
(:mod:`~recbole_ilora.leaderboard.grid`), appending each result to ``<output_dir>/results.jsonl`` as it
finishes, and then writes ``leaderboard.{md,csv,tex,json}`` (:mod:`~recbole_ilora.leaderboard.tables`)
and ``leaderboard.png`` (:mod:`~recbole_ilora.leaderboard.plot`) beside it. Rerunning the command resumes
an interrupted grid; ``--export_only`` rebuilds the exports from the results file without running.
"""

from __future__ import annotations

import os
from pathlib import Path

from recbole_ilora.leaderboard.grid import (
    Cell,
    GridRun,
    GridSpec,
    RESULTS_FILE_NAME,
    GridSpecError,
    ResultsStore,
    config_hash,
    load_grid_spec,
    run_grid,
)
from recbole_ilora.leaderboard.significance import paired_test, pool_pairs
from recbole_ilora.leaderboard.tables import Leaderboard, build_leaderboard, export_tables


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
) -> dict:
    """Run (unless ``export_only``) and export the grid in ``grid_path``; used by ``run_recbole_ilora.py``.

    Returns ``{"results": results file, "exports": {format: path}, "failed": [failed records]}``.
    """
    spec = load_grid_spec(grid_path)
    store = ResultsStore(results_path or Path(spec.output_dir) / RESULTS_FILE_NAME)
    failed = []
    if not export_only:
        kwargs = {"runner": runner} if runner is not None else {}
        run = run_grid(spec, store.path, cli_overrides, config_files, saved=saved, **kwargs)
        failed = run.failed
    exports = export_leaderboard(spec, store, Path(results_path).parent if results_path else None,
                                 cli_overrides, config_files)
    print("Leaderboard written:\n" + "\n".join(f"  {fmt:8s} {path}" for fmt, path in exports.items()))
    return {"results": store.path, "exports": exports, "failed": failed}


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
]
