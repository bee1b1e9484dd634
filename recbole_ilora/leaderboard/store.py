"""The grid's results file: one JSON line per finished cell, shared by shards under a file lock.

A cell is identified by ``(model, dataset, seed, config_hash)`` (:func:`record_key`), where
:func:`config_hash` covers the cell's merged settings and the contents of its config files. Each record
is written as one ``write`` of a complete line followed by ``flush`` and ``fsync``, so a crash or Ctrl-C
loses at most the cell that was running; a last line cut short by a crash is reported and ignored when
reading (its cell simply runs again). Appends, reads and claims hold the file's lock (``filelock``, on
``<results>.lock`` beside it), so several grid processes can share the file and never read another's
half-written line; :meth:`ResultsStore.claim` lets them take cells one at a time.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from filelock import FileLock

from recbole_ilora.utils import file_fingerprint, fingerprint, result_settings

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "results.jsonl"
HASH_LENGTH = 16


def config_hash(overrides: dict, config_files: Iterable[str] = (), model: str | None = None) -> str:
    """A stable 16-hex-digit hash of a cell's merged settings (minus :data:`~recbole_ilora.utils.NON_RESULT_KEYS`).

    The contents of ``config_files`` are hashed too, so editing one re-runs the cells that use it.
    ``model`` (a variant's registered model; its row name is already in the record's key) is hashed
    when given. Settings in ``properties/*.yaml`` are not part of the hash: after changing one, delete
    the affected lines of the results file (or use a new ``output_dir``).
    """
    payload = {
        "overrides": result_settings(overrides),
        "config_files": [[str(path), file_fingerprint(path)] for path in config_files],
    }
    if model is not None:  # only then: the hashes of plain models' cells stay those of older results files
        payload["model"] = str(model)
    # One canonical text (sorted keys, compact separators, repr for values JSON lacks): the hashes of
    # results files written by earlier versions stay valid, so those grids keep resuming.
    text = json.dumps(payload, sort_keys=True, default=repr, separators=(",", ":"))
    return fingerprint(text, length=HASH_LENGTH)


def record_key(record: dict) -> tuple:
    """``(model, dataset, seed, config_hash)`` of a record, the same tuple as a cell's ``key``."""
    return (record["model"], record["dataset"], record["seed"], record["config_hash"])


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """The grid's JSON-lines results file: ``ok``, ``failed`` and ``claimed`` records, appended atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(self.lock_path)

    def append(self, record: dict) -> None:
        """Append one record as one line, durably (see the module docstring)."""
        line = json.dumps(record, default=_json_default) + "\n"
        with self._lock(), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def load(self) -> list[dict]:
        """All readable records, in file order."""
        if not self.path.exists():
            return []
        with self._lock(), open(self.path, encoding="utf-8") as handle:  # never another shard's half-written line
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

    def claim(self, keys: Sequence[tuple], run_id: str, shard: str) -> tuple | None:
        """Take the first cell key that is neither finished nor claimed by a shard of run ``run_id``.

        Reading and appending the ``claimed`` record happen under one exclusive lock, so two shards
        never take the same cell; claims of other runs (e.g. one that was killed) do not count.
        """
        with self._lock(), open(self.path, "a+", encoding="utf-8") as handle:
            handle.seek(0)
            taken = {
                record_key(r) for r in self._parse(handle.read())
                if r.get("status") == "ok" or (r.get("status") == "claimed" and r.get("run_id") == run_id)
            }
            for key in keys:
                if key not in taken:
                    model, dataset, seed, cell_hash = key
                    claim = {"status": "claimed", "run_id": run_id, "shard": shard, "model": model,
                             "dataset": dataset, "seed": seed, "config_hash": cell_hash, "timestamp": utc_timestamp()}
                    handle.write(json.dumps(claim) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    return key
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
