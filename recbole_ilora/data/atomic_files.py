"""Make sure a dataset's atomic files exist before RecBole looks for them: fail fast, never hang.

RecBole 1.2.1 downloads a missing dataset in ``Dataset._download`` only when the folder
``<data_path>/<dataset>`` does not exist at all (an existing folder without the ``.inter`` file gives
"File ... not exist"). Its download is unusable unattended:

- ``urllib.request.urlopen`` is called without a timeout, so without network it can hang for minutes
  (or fail only after the OS gives up) instead of failing fast;
- ``decide_download`` asks for confirmation with ``input()`` for archives over 1 GB; with no stdin
  (batch jobs, CI) ``input()`` raises ``EOFError``, and an answer other than "y" calls ``exit(-1)``;
- after a successful download it calls ``torch.distributed.barrier()``, which raises "Default process
  group has not been initialized" in every single-process run: the first run crashes after
  downloading (the second run finds the files).

:func:`check_atomic_files`, called by ``recbole_ilora.quick_start`` before ``create_dataset``, therefore
does the check itself: files present -> nothing to do; a dataset RecBole can download and whose host
answers within 3 s -> it downloads with a timeout using RecBole's own URL list and unpacking helpers,
so RecBole never reaches ``_download``; otherwise one clear error saying where to put which files.
Files present, it validates them with :func:`~recbole_ilora.data.validation.check_raw_files`.
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from recbole_ilora.data.item_text import DatasetError
from recbole_ilora.data.validation import check_raw_files

__all__ = ["check_atomic_files", "recbole_download_url", "host_reachable"]

# Names in RecBole's url.yaml that this plugin uses for a *different* dataset: downloading RecBole's
# version would silently train on other data than the papers'. Value: how to obtain ours.
_PLUGIN_DATASETS = {
    "lastfm": (
        "The plugin's 'lastfm' is the LLaRA/iLoRA authors' LastFM split (1,220 users, 4,606 artists), not "
        "RecBole's downloadable 'lastfm' (a different preprocessing of Last.fm). Convert the authors' files: "
        "python -m recbole_ilora.data.llara <iLoRA repo>/data/ref/lastfm {out} --name lastfm"
    ),
    "steam": (
        "The plugin's 'steam' is the LLaRA/iLoRA authors' Steam data (only its test split is public). "
        "Convert it: python -m recbole_ilora.data.llara <iLoRA repo>/data/ref/steam {out} --name steam"
    ),
}

# Headers of RecBole's MovieLens atomic files, quoted in the error so users can build them by hand.
_KNOWN_HEADERS = {
    "ml-1m": (
        "ml-1m.inter: user_id:token item_id:token rating:float timestamp:float; "
        "ml-1m.item: item_id:token movie_title:token_seq release_year:token genre:token_seq"
    ),
}


def recbole_download_url(dataset: str) -> str | None:
    """The URL RecBole 1.2.1 downloads ``dataset`` from (its ``properties/dataset/url.yaml``), or None."""
    import recbole

    url_file = Path(recbole.__file__).resolve().parent / "properties" / "dataset" / "url.yaml"
    with open(url_file, encoding="utf-8") as f:
        urls = yaml.safe_load(f)
    return urls.get(dataset)


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds (no data is sent)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused, unreachable, timed out: all mean "no download possible"
        return False


def _download(url: str, dataset_dir: Path, dataset: str, timeout: float = 30.0) -> None:
    """Download and unpack RecBole's zip of ``dataset`` into ``dataset_dir`` (RecBole's own steps)."""
    from recbole.utils.url import extract_zip, rename_atomic_files

    dataset_dir.mkdir(parents=True, exist_ok=True)
    archive = dataset_dir / url.rpartition("/")[2]
    partial = archive.with_suffix(archive.suffix + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    partial.replace(archive)
    extract_zip(str(archive), str(dataset_dir))
    archive.unlink()
    rename_atomic_files(str(dataset_dir), archive.stem, dataset)


def _required_files(config) -> list[Path]:
    dataset_dir = Path(config["data_path"])
    name = config["dataset"]
    benchmark = config["benchmark_filename"] if "benchmark_filename" in config else None
    if benchmark:
        return [dataset_dir / f"{name}.{part}.inter" for part in benchmark]
    return [dataset_dir / f"{name}.inter"]


def check_atomic_files(config, *, reachable=host_reachable, download=_download) -> None:
    """Raise :class:`DatasetError` unless ``config``'s dataset can be loaded without prompts or hangs.

    ``config["data_path"]`` is RecBole's dataset folder (``<data_path>/<dataset>``, already joined by
    RecBole's Config). ``reachable`` and ``download`` are injectable so tests never touch the network.
    Not safe for concurrent ranks of a distributed run: call it once before spawning them.
    """
    name = config["dataset"]
    dataset_dir = Path(config["data_path"])
    missing = [path for path in _required_files(config) if not path.is_file()]
    if not missing:
        check_raw_files(config)
        return
    missing_text = ", ".join(path.name for path in missing)
    if name in _PLUGIN_DATASETS:
        raise DatasetError(
            f"Dataset '{name}' not found at {dataset_dir} (missing {missing_text}). "
            + _PLUGIN_DATASETS[name].format(out=dataset_dir.parent)
            + f" (it writes {dataset_dir}/{name}.inter and {name}.item), or set --data_path to the folder "
            f"that contains {name}/."
        )
    if "benchmark_filename" in config and config["benchmark_filename"]:
        raise DatasetError(
            f"Dataset '{name}': benchmark files {missing_text} not found in {dataset_dir} "
            f"(benchmark_filename={list(config['benchmark_filename'])}). Write them (for the authors' splits: "
            f"python -m recbole_ilora.data.llara) or drop benchmark_filename to split {name}.inter by RecBole."
        )
    url = recbole_download_url(name)
    header_hint = f" (RecBole atomic format: {_KNOWN_HEADERS[name]})" if name in _KNOWN_HEADERS else ""
    if url is None:
        raise DatasetError(
            f"Dataset '{name}' not found at {dataset_dir} (missing {missing_text}), and RecBole cannot "
            f"download a dataset of that name. Put {name}.inter (and {name}.item for item titles) in "
            f"RecBole's atomic format there, or set --data_path to the folder that contains {name}/."
        )
    if not reachable(url):
        raise DatasetError(
            f"Dataset '{name}' not found at {dataset_dir} (missing {missing_text}) and the network is not "
            f"reachable (no connection to {urllib.parse.urlparse(url).hostname} within 3 s). Put "
            f"{name}.inter and {name}.item there{header_hint}, or run once with a network so the files are "
            f"downloaded from {url}."
        )
    download(url, dataset_dir, name)
    still_missing = [path.name for path in _required_files(config) if not path.is_file()]
    if still_missing:
        raise DatasetError(
            f"Dataset '{name}': downloaded {url} into {dataset_dir}, but {', '.join(still_missing)} is still "
            f"missing there (found: {sorted(os.listdir(dataset_dir))}). Put the atomic files there by hand."
        )
    check_raw_files(config)
