"""The leaderboard's results file is shared by shard processes under a portable file lock (``filelock``)."""

from __future__ import annotations

import threading

from filelock import FileLock

from recbole_ilora.leaderboard.store import ResultsStore


def test_writers_and_readers_wait_while_another_process_holds_the_results_lock(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    record = {"status": "ok", "model": "SASRec", "dataset": "d", "seed": 1, "config_hash": "h"}
    done = []
    with FileLock(str(tmp_path / "results.jsonl.lock")):  # as another shard would hold it
        writer = threading.Thread(target=lambda: done.append(store.append(record)))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not done  # waiting for the lock, nothing written yet
    writer.join(timeout=10)
    assert done and store.load() == [record]
    claimed = store.claim([("SASRec", "d", 1, "h"), ("SASRec", "d", 2, "h")], run_id="r", shard="0/1")
    assert claimed == ("SASRec", "d", 2, "h")  # the finished cell is skipped
