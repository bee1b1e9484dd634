"""Leaderboard: run a grid of models x datasets x seeds and export one comparison table.

``python run_recbole_ilora.py --leaderboard properties/leaderboard.yaml`` runs every cell of the grid,
appending each result to ``<output_dir>/results.jsonl`` as it finishes, and then writes
``leaderboard.{md,csv,tex,json,png}`` and ``validation.{md,csv}`` beside it. Rerunning the command resumes an interrupted grid;
``--export_only`` rebuilds the exports from the results file without running.

Modules, lowest first: :mod:`.store` (the results file and a cell's settings hash), :mod:`.tuning`
(the ``tune`` section and the validation-only choice), :mod:`.spec` (the grid YAML and its cells),
:mod:`.significance` (paired tests), :mod:`.tables` (aggregation and table layout), :mod:`.plot`,
:mod:`.exports` (the files), :mod:`.runner` (running cells, shards, resuming) and :mod:`.jobs`
(``--jobs=N`` shard processes).
"""

from recbole_ilora.leaderboard.exports import export_leaderboard, export_tables
from recbole_ilora.leaderboard.jobs import run_leaderboard_jobs
from recbole_ilora.leaderboard.runner import (
    GridRun,
    run_cell,
    run_grid,
    run_leaderboard,
)
from recbole_ilora.leaderboard.significance import paired_test, pool_pairs
from recbole_ilora.leaderboard.spec import Cell, GridSpec, GridSpecError, load_grid_spec
from recbole_ilora.leaderboard.store import RESULTS_FILE_NAME, ResultsStore, config_hash
from recbole_ilora.leaderboard.tables import Leaderboard, build_leaderboard
from recbole_ilora.leaderboard.tuning import TuneSpec, TuningResult

__all__ = [
    "RESULTS_FILE_NAME",
    "Cell",
    "GridRun",
    "GridSpec",
    "GridSpecError",
    "Leaderboard",
    "ResultsStore",
    "TuneSpec",
    "TuningResult",
    "build_leaderboard",
    "config_hash",
    "export_leaderboard",
    "export_tables",
    "load_grid_spec",
    "paired_test",
    "pool_pairs",
    "run_cell",
    "run_grid",
    "run_leaderboard",
    "run_leaderboard_jobs",
]
