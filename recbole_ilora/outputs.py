"""Where a run writes: every output under one root, ``output_root`` (default ``outputs``).

- ``<output_root>/log/<model>/<model>-<dataset>-<time>-<hash>.log``: the run's log. The console shows
  the protocol, data statistics, progress and results at RecBole's ``state`` level; the file also gets
  the DEBUG details (the full configuration, the model printout, the environment).
- ``<output_root>/log_tensorboard/<log file name>/``: RecBole's TensorBoard events, beside the log.
- ``<output_root>/saved/``: checkpoints (``checkpoint_dir``, relative to the root unless absolute),
  including the cached gate encoders.
- ``<output_root>/results/``: leaderboard results and exports.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import colorlog
import yaml
from recbole.utils import get_local_time
from recbole.utils.logger import RemoveColorFilter, log_colors_config

from recbole_ilora.utils import fingerprint, properties_dir

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


# Replaces the default output_root (not a value given in a settings file or on the command line): the test
# suite points it at a temporary folder, so that nothing it runs -- subprocesses included -- writes into outputs/.
OUTPUT_ROOT_ENV = "RECBOLE_ILORA_OUTPUT_ROOT"


def output_root(config) -> Path:
    return Path(config["output_root"] or ".")


def default_output_root() -> Path:
    """``output_root`` of ``properties/overall.yaml`` (or ``$RECBOLE_ILORA_OUTPUT_ROOT``), for outputs written
    outside a run's Config (leaderboards, TensorBoard events of a trainer without a log file)."""
    if os.environ.get(OUTPUT_ROOT_ENV):
        return Path(os.environ[OUTPUT_ROOT_ENV])
    with open(properties_dir() / "overall.yaml", encoding="utf-8") as handle:
        return Path(yaml.safe_load(handle).get("output_root") or ".")


def resolve_checkpoint_dir(config) -> Path:
    """``checkpoint_dir`` under ``output_root`` (an absolute ``checkpoint_dir`` is kept); written back into ``config``."""
    path = Path(config["checkpoint_dir"])
    if not path.is_absolute():
        path = output_root(config) / path
    config["checkpoint_dir"] = str(path)
    # RecBole's Trainer creates it with a check-then-mkdir that races between the processes of a
    # distributed run or parallel leaderboard shards; creating it here first is race-free.
    path.mkdir(parents=True, exist_ok=True)
    return path


def init_logger(config) -> Path:
    """RecBole's ``init_logger`` rooted at ``output_root``: console at ``state`` level, file at DEBUG."""
    folder = output_root(config) / "log" / config["model"]
    folder.mkdir(parents=True, exist_ok=True)  # race-free (parallel processes on a fresh checkout)
    digest = fingerprint("".join(str(value) for value in config.final_config_dict.values()), length=6)
    path = folder / f"{config['model']}-{config['dataset']}-{get_local_time()}-{digest}.log"

    file_handler = logging.FileHandler(path)
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s", "%a %d %b %Y %H:%M:%S"))
    file_handler.addFilter(RemoveColorFilter())
    console = logging.StreamHandler()
    console.setLevel(LEVELS.get(str(config["state"] or "info").lower(), logging.INFO))
    if _is_terminal(console.stream):
        console.setFormatter(colorlog.ColoredFormatter("%(log_color)s%(asctime)-15s %(levelname)s  %(message)s",
                                                       "%d %b %H:%M", log_colors=log_colors_config))
    else:  # redirected to a file or a pipe: no ANSI colour codes (RecBole colours parts of its messages too)
        console.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s", "%d %b %H:%M"))
        console.addFilter(RemoveColorFilter())
    file_handler.addFilter(_details_of_this_run)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(console)
    root.addHandler(file_handler)
    return path


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def show_progress_bars(config) -> bool:
    """Progress bars only on a terminal: redirected, their redraws and colour codes are noise."""
    import sys

    return bool(config["show_progress"]) and _is_terminal(sys.stderr)


@contextmanager
def details_to_log_file():
    """INFO records of the block go to the run's log file only: the console handlers show warnings and errors."""
    root = logging.getLogger()
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [handler.level for handler in consoles]
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)


def dataset_summary(dataset) -> str:
    """One line of counts without RecBole's padding ids (its printout counts user and item 0)."""
    return (f"Dataset {dataset.dataset_name}: {dataset.user_num - 1:,} users, {dataset.item_num - 1:,} items, "
            f"{len(dataset.inter_feat):,} interactions after the filters")


def _details_of_this_run(record: logging.LogRecord) -> bool:
    # DEBUG records of RecBole and the plugin (which log through the root logger), not of every library.
    return record.levelno >= logging.INFO or record.name == "root" or record.name.startswith("recbole")


def tensorboard_dir(log_file: str | os.PathLike) -> Path:
    """``<root>/log/<model>/<name>.log`` -> ``<root>/log_tensorboard/<name>`` (RecBole's layout, rooted)."""
    log_file = Path(log_file)
    return log_file.parent.parent.parent / "log_tensorboard" / log_file.name.split(".")[0]
