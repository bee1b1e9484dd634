"""``--jobs=N``: run a grid as N shard processes of this command line, then export once all have finished.

Small LLMs leave a GPU mostly idle, so several cells can share it. Each child is the same
``run_recbole_ilora.py`` command line without ``--jobs`` and with ``--shard=I/N`` and one shared
``--run_id``, so the children take the next free cell from the results file
(:meth:`~recbole_ilora.leaderboard.store.ResultsStore.claim`) rather than every N-th.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Sequence

from recbole_ilora.leaderboard.exports import export_leaderboard
from recbole_ilora.leaderboard.spec import load_grid_spec
from recbole_ilora.leaderboard.store import RESULTS_FILE_NAME, ResultsStore

# How a child runs the command line: the same entry point as run_recbole_ilora.py, from any directory.
CHILD_ENTRY = "from recbole_ilora.cli import main; main()"


def shard_argv(argv: Sequence[str], index: int, jobs: int, run_id: str) -> list[str]:
    """``argv`` (a ``--leaderboard`` command line) minus ``--jobs N`` / ``--jobs=N``, as shard ``index`` of ``jobs``."""
    child, skip_next = [], False
    for arg in argv:
        if skip_next or arg.startswith("--jobs="):
            skip_next = False
            continue
        if arg == "--jobs":
            skip_next = True
            continue
        child.append(arg)
    return [*child, f"--shard={index}/{jobs}", f"--run_id={run_id}"]


def run_leaderboard_jobs(
    grid_path: str | os.PathLike,
    jobs: int,
    argv: Sequence[str],
    results_path: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files=None,
) -> dict:
    """Run ``argv`` (a ``--leaderboard`` command line) as ``jobs`` shard processes, then export.

    Each process writes its output to ``<results dir>/shard-I.log``. A job that fails does not stop the
    others; the exit codes are reported and the exports are written from whatever finished.
    Returns ``{"results": results file, "exports": {format: path}, "failed_jobs": [shard indices]}``.
    """
    spec = load_grid_spec(grid_path)
    store = ResultsStore(results_path or spec.results_dir(cli_overrides) / RESULTS_FILE_NAME)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    processes, logs = [], []
    for index in range(jobs):
        log_path = store.path.parent / f"shard-{index}.log"
        log = open(log_path, "w", encoding="utf-8")
        logs.append(log)
        command = [sys.executable, "-c", CHILD_ENTRY, *shard_argv(argv, index, jobs, run_id)]
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
    return {"results": store.path, "exports": exports, "failed_jobs": failed_jobs}
