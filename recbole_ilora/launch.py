"""Starting a run from the command line: in this process, ``--nproc=N`` processes (RecBole's ``mp.spawn``
way) or as one of ``torchrun``'s.

The launcher consumes RecBole's settings ``nproc``, ``world_size``, ``ip``, ``port``, ``group_offset``
(``offset``); each process then runs :func:`recbole_ilora.quick_start.run_recbole_ilora` with its
``local_rank``.

It sits beside the command line, above the quick start it runs; :mod:`recbole_ilora.distributed` below
both holds what the processes share.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from logging import getLogger
from pathlib import Path

from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.distributed import LAUNCH_KEYS
from recbole_ilora.interrupt import TrainingInterrupted, two_stage_interrupt

def torchrun_settings() -> dict:
    """Config settings of a process started by ``torchrun`` (empty when not started by it)."""
    env = os.environ
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return {}
    local_rank, rank = int(env["LOCAL_RANK"]), int(env["RANK"])
    return {
        "local_rank": local_rank,
        "world_size": int(env["WORLD_SIZE"]),
        "nproc": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
        "offset": rank - local_rank,
        "ip": env.get("MASTER_ADDR", "localhost"),
        "port": env.get("MASTER_PORT", "29500"),
        "ddp_init_method": "env://",
    }


def pop_launch_settings(overrides: dict) -> dict:
    """Remove RecBole's launch settings from command-line overrides and return them."""
    launch = {key: overrides.pop(key) for key in LAUNCH_KEYS if key in overrides}
    if "offset" in launch:
        launch.setdefault("group_offset", launch.pop("offset"))
    return launch


def wants_spawn(launch: dict) -> bool:
    return int(launch.get("nproc", 1)) > 1 or int(launch.get("world_size", -1)) > 0


def _spawn_worker(local_rank, model, dataset, config_file_list, config_dict, saved, result_path):
    config_dict = {**config_dict, "local_rank": local_rank}
    try:
        result = run_recbole_ilora(model, dataset, config_file_list=config_file_list, config_dict=config_dict,
                                   saved=saved)
    except TrainingInterrupted as interrupted:
        result = interrupted  # re-raised by the launcher (mp.spawn would report a clean exit)
    if local_rank == 0 and int(config_dict.get("offset", 0)) == 0:
        with open(result_path, "wb") as file:
            pickle.dump(result, file)


def workers_handle_first_interrupt():
    """Ctrl-C reaches every process of the terminal's group: the workers stop at their next optimiser step
    and write a resume checkpoint, so the launcher waits for them instead of killing them; a second Ctrl-C
    stops it at once."""
    return two_stage_interrupt(lambda: getLogger().warning(
        "Interrupt: waiting for the workers to stop at their next optimiser step (Ctrl-C again to stop at once)."))


def spawn(model, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
          ip="localhost", port="5678", group_offset=0):
    """RecBole's ``quick_start.run`` for this plugin: ``nproc`` processes on this node with ``mp.spawn``.

    Returns global rank 0's result dict (``None`` on other nodes). Unlike RecBole's, the result travels
    through a file, not a pipe that blocks once it holds more than 64 KB (per-user metric vectors).
    Raises :class:`~recbole_ilora.interrupt.TrainingInterrupted` when the workers stopped on Ctrl-C.
    """
    import torch.multiprocessing as mp

    config_dict = dict(config_dict or {})
    config_dict.update({
        "nproc": int(nproc), "world_size": int(world_size) if int(world_size) > 0 else int(nproc),
        "ip": str(ip), "port": str(port), "offset": int(group_offset),
    })
    with tempfile.TemporaryDirectory(prefix="recbole_ilora_ddp_") as folder:
        result_path = str(Path(folder) / "result.pkl")
        with workers_handle_first_interrupt():
            mp.spawn(
                _spawn_worker, args=(model, dataset, config_file_list, config_dict, saved, result_path),
                nprocs=int(nproc), join=True,
            )
        if not Path(result_path).is_file():
            return None
        with open(result_path, "rb") as file:
            result = pickle.load(file)  # written just above by our own worker
    if isinstance(result, TrainingInterrupted):
        raise result
    return result


def run_from_command_line(model, dataset, config_file_list=None, overrides=None, saved=True):
    """One run of ``run_recbole_ilora.py``: here, in ``--nproc=N`` spawned processes, or as a torchrun worker.

    A run stopped by Ctrl-C at an optimiser step (the trainer has logged the command that resumes it)
    ends the program with status 130, the shell's code for an interrupt, without a traceback.
    """
    overrides = dict(overrides or {})
    launch = pop_launch_settings(overrides)
    try:
        if torchrun_settings():
            overrides.update(torchrun_settings())
        elif wants_spawn(launch):
            return spawn(model, dataset, config_file_list, overrides, saved=saved, **launch)
        return run_recbole_ilora(model=model, dataset=dataset, config_file_list=config_file_list,
                                 config_dict=overrides, saved=saved)
    except TrainingInterrupted:
        raise SystemExit(130) from None
