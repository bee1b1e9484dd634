"""Speed of iLoRA, LLaRA and stock peft LoRA, eager and compiled, in one process on one LLM and real prompts.

    python benchmarks/throughput.py                                              # CPU smoke: tiny-random-llama
    python benchmarks/throughput.py --llm_path=smollm2-135m --compile=both --liger   # GPU: the README table

Sections (``--sections``), each printed and written to ``--out`` (JSON) as soon as it finishes:

- ``train``: optimiser steps (forward + backward + fused AdamW) on the same real ml-100k training batches
  for iLoRA (K experts, gated), LLaRA (K=1) and stock peft LoRA on the same token batches with
  transformers' own loss (``labels=``: full-vocabulary logits at every position, no gate, no behavioural
  tokens), and ``frozen``: iLoRA's step with its adapters switched off (the floor under any adapter: the
  frozen decoder's forward and backward to the behavioural tokens). ``--compile=both`` runs each eager and
  compiled (``iLoRA.compile_llm``: every decoder layer, regional, with ``--compile_options``); ``--liger`` adds
  iLoRA with liger-kernel's fused RMSNorm / SwiGLU / RoPE (GPU only). Per variant: ``warmup_s`` (the
  ``--warmup`` steps, compilation included), the median step of ``--steps`` more, samples/s, tokens/s, the
  padding share of the token slots, peak memory and ``compiles_while_timed``.
- ``eval``: uni19 users/s of packed candidate scoring (what ``predict`` does), eager and compiled, and
  of greedy generation (the authors' protocol, ``--max_new_tokens``); the ratio of the two.
- ``fullrank``: seconds to score every item for every ml-100k test user, and for a catalogue of ml-1m's
  size (``--synthetic_users`` x ``--synthetic_items`` titles cycled from ml-100k's, so token lengths are
  realistic); ``--synthetic_measure_users`` users are scored and the total extrapolated linearly. The scorer
  applies its mask as ``score_attention`` says (``auto``: FlexAttention on CUDA, one copy of the prompt for the
  whole catalogue; ``--settings='{"score_attention": "dense"}'`` for the dense packs); under flex, each row also
  gives ``max_abs_diff_vs_dense``, its first batch of users scored again under the dense mask; ``--fullrank_floor``
  ranks the real users again with the adapters off (what the LoRA branch costs).
- ``memory``: the largest training batch that fits (doubling from ``--batch_size`` until out of memory),
  eager iLoRA, with peak memory per batch size.

A second run of the same command reuses torch's compilation caches (inductor's FX graph and autotune
caches under ``TORCHINDUCTOR_CACHE_DIR``): compare ``warmup_s`` of the two runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import recbole_ilora  # noqa: E402,F401 - compatibility fixes first
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.data.interaction import cat_interactions  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_ilora.config import Config  # noqa: E402
from recbole_ilora.evaluation import prepare_eval_loaders  # noqa: E402
from recbole_ilora.llm import resolve_dtype  # noqa: E402
from recbole_ilora.pipeline import build_model  # noqa: E402
from recbole_ilora.prompt import ANSWER, PromptBuilder, candidate_counts, load_templates  # noqa: E402
from recbole_ilora.sampling import training_candidates  # noqa: E402
from recbole_ilora.scoring import DENSE_PACK_TOKENS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_path", default="tiny-random-llama")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--sections", default="train,eval,fullrank")
    parser.add_argument("--variants", default="iLoRA,LLaRA,peft",
                        help="training variants: iLoRA, LLaRA, TALLRec, peft (stock peft LoRA), frozen (no adapter)")
    parser.add_argument("--compile", choices=("none", "only", "both"), default="none",
                        help="eager only, compiled only, or both side by side")
    parser.add_argument("--liger", action="store_true", help="add iLoRA with liger-kernel (GPU)")
    parser.add_argument("--batch_size", type=int, default=32, help="training prompts per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--eval_users", type=int, default=256, help="uni19 users per scoring variant")
    parser.add_argument("--eval_batch_users", type=int, default=16)
    parser.add_argument("--generate_users", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--fullrank_batch_users", type=int, default=16)
    parser.add_argument("--fullrank_users", type=int, default=None, help="limit the real test users (default all)")
    parser.add_argument("--fullrank_floor", action="store_true",
                        help="rank the real test users again with the adapters off: what the LoRA branch costs")
    parser.add_argument("--score_pack_tokens", type=int, default=None, help="default: the model's setting")
    parser.add_argument("--synthetic_users", type=int, default=6040)
    parser.add_argument("--synthetic_items", type=int, default=3706)
    parser.add_argument("--synthetic_measure_users", type=int, default=256)
    parser.add_argument("--max_memory_batch", type=int, default=1024)
    parser.add_argument("--simulate", choices=sorted(SIMULATED), default=None,
                        help="train section only: an LLM of this architecture with random weights, built in code "
                             "(no weights needed), with --llm_path's tokenizer")
    parser.add_argument("--batch_sizes", default=None,
                        help="comma-separated micro-batches for the train section (default: --batch_size)")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="off",
                        help="activation checkpointing of the decoder layers in the train section")
    parser.add_argument("--settings", type=json.loads, default={},
                        help='JSON of model settings for every variant, e.g. \'{"lora_dropout": 0.0}\'')
    parser.add_argument("--torch_config", type=json.loads, default={},
                        help='JSON of torch compiler settings set before anything compiles, keyed by torch._inductor or '
                             'torch._functorch config name, e.g. \'{"inductor.fallback_random": true}\'')
    parser.add_argument("--compile_options", type=json.loads, default={},
                        help='JSON of torch.compile keyword arguments for the compiled variants, e.g. '
                             '\'{"mode": "max-autotune-no-cudagraphs"}\' or \'{"mode": "reduce-overhead"}\'')
    parser.add_argument("--out", default="outputs/results/benchmark.json")
    return parser.parse_args(argv)


def apply_torch_config(settings: dict) -> None:
    """Set ``torch._inductor.config`` / ``torch._functorch.config`` entries (``{"inductor.name": value}``; nested
    ones as ``inductor.triton.cudagraphs``)."""
    import torch._functorch.config
    import torch._inductor.config

    modules = {"inductor": torch._inductor.config, "functorch": torch._functorch.config}
    for key, value in settings.items():
        prefix, *path = key.split(".")
        owner = modules.get(prefix)
        for part in path[:-1]:
            owner = getattr(owner, part, None)
        if owner is None or not path or not hasattr(owner, path[-1]):
            raise SystemExit(f"--torch_config: {key!r} is not a torch._inductor or torch._functorch config entry "
                             f"(write it as inductor.<name> or functorch.<name>).")
        setattr(owner, path[-1], value)


# Architectures to simulate with random weights: the paper's LLM, from its published config.
SIMULATED = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=4096),  # to rehearse on a CPU
}


def simulated_llm_loader(name: str, tokenizer_path: str):
    """A ``load_llm`` that builds ``SIMULATED[name]`` with random bf16 weights on the GPU, with the tokenizer of
    ``tokenizer_path`` (its vocabulary sizes the embedding; the LM head only runs at answer positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recbole_ilora.llm import load_llm

    def load(llm_path, dtype, corpus=()):
        _, tokenizer = load_llm(tokenizer_path, dtype, corpus)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             tie_word_embeddings=False, **SIMULATED[name])
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
        return model, tokenizer

    return load


# ---------------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def train_sizes(args) -> list[int]:
    """Micro-batches of the train section; the loader yields the largest, the others take its first samples."""
    return [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]


def compile_modes(args) -> list[bool]:
    return {"none": [False], "only": [True], "both": [False, True]}[args.compile]


def setup(args):
    overrides = {
        "llm_path": args.llm_path,
        # Speed does not depend on how well the gate encoder ranks: one epoch keeps the set-up short.
        "gate_sasrec": {"epochs": 1, "hidden_size": 64, "inner_size": 256, "train_batch_size": 512},
        "train_batch_size": max(train_sizes(args)),
        "eval_batch_size": 20 * args.eval_batch_users,
        "curriculum": False,  # every step with behavioural tokens: the heavier, steady case
        "show_progress": False,
        "state": "WARNING",
    }
    if args.score_pack_tokens:
        overrides["score_pack_tokens"] = args.score_pack_tokens
    overrides.update(args.settings)
    config = Config(model="iLoRA", dataset=args.dataset, config_dict=overrides)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    prepare_eval_loaders(config, valid, test)
    return overrides, config, train, test


def build(model_name, overrides, args, train, compiled=False, checkpointing=False, **changes):
    torch._dynamo.reset()  # each variant compiles (or not) from scratch
    config = Config(model=model_name, dataset=args.dataset, config_dict={**overrides, **changes})
    init_seed(config["seed"], True)
    if args.simulate:
        import recbole_ilora.model.ilora as ilora_module

        ilora_module.load_llm = simulated_llm_loader(args.simulate, args.llm_path)
    model = build_model(config, train._dataset).to(config["device"])
    if checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        model.compile_llm(**args.compile_options)
    return model


def first_batches(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch[0] if isinstance(batch, tuple) else batch)
        if len(batches) == count:
            break
    return batches


def report_section(report, name, rows, args):
    import pandas as pd

    report[name] = rows
    print(f"\n## {name}\n" + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


# --------------------------------------------------------------------------------------------- training
def bench_steps(name, step, batches, args, device) -> dict:
    """``--warmup`` steps (compilation happens here), then ``--steps`` timed steps."""
    reset_peak(device)
    warmup_s, _ = timed(lambda: [step(batches[i % len(batches)]) for i in range(args.warmup)], device)
    graphs = compiled_graphs()
    times, tokens, slots = [], 0, 0
    for i in range(args.steps):
        seconds, (used, total) = timed(lambda: step(batches[(args.warmup + i) % len(batches)]), device)
        times.append(seconds)
        tokens, slots = tokens + int(used), slots + int(total)
    median = statistics.median(times)
    return {
        "variant": name, "warmup_s": warmup_s, "step_ms": 1000 * median, "samples_per_s": len(batches[0]) / median,
        "tokens_per_s": tokens / args.steps / median, "padding_share": 1 - tokens / slots,
        "peak_gib": peak_gib(device), "compiles_while_timed": compiled_graphs() - graphs,
    }


def model_step(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=next(model.parameters()).is_cuda)
    model.train()

    def step(interaction):
        output = model(interaction.to(model.device))
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.tokens, output.token_slots

    return step


def frozen_decoder_step(model):
    """The floor under any adapter: iLoRA's step with every adapter switched off (peft's ``disable_adapter``), so
    the backward pass still runs through the whole frozen decoder to the projector's behavioural tokens."""
    step = model_step(model)

    def floor(interaction):
        with model.llm.disable_adapter():
            return step(interaction)

    return floor


def stock_peft_step(model, compiled):
    """Stock peft LoRA on the same prompts: HF loss via labels=, no gate, text only (placeholders = pad ids)."""
    llm = model.llm  # LLaRA's adapter: one expert, plain peft LoRA
    forward = torch.compile(llm) if compiled else llm
    optimizer = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-4,
                                  fused=next(llm.parameters()).is_cuda)

    def step(interaction):
        interaction = interaction.to(model.device)
        target = interaction[model.POS_ITEM_ID]
        candidates = training_candidates(target, model.recent_history(interaction)[0], model.n_items, model.num_candidates)
        prompts = model.encode(interaction, candidates, template=torch.zeros_like(target), target=target).prompts
        labels = torch.where(prompts.kind == ANSWER, prompts.input_ids, -100)
        with model.autocast():
            loss = forward(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask.long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return prompts.lengths.sum(), prompts.input_ids.numel()

    return step


def apply_liger(model):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model.llm.get_base_model())


def bench_training(overrides, args, train, device):
    rows = []
    sizes = train_sizes(args)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for batch_size in sizes:
        batches = [b[torch.arange(batch_size)] for b in first_batches(train, args.warmup + args.steps)]
        for compiled in compile_modes(args):
            for checkpoint in checkpointing:
                mode = ("compiled" if compiled else "eager") + (", activation checkpointing" if checkpoint else "")
                for variant in args.variants.split(","):
                    try:
                        if variant == "frozen":
                            model = build("iLoRA", overrides, args, train, compiled, checkpoint)
                            row = bench_steps(f"frozen decoder, no adapter (the floor), {mode}",
                                              frozen_decoder_step(model), batches, args, device)
                        elif variant == "peft":
                            model = build("LLaRA", overrides, args, train, checkpointing=checkpoint)
                            row = bench_steps(f"stock peft LoRA, {mode}", stock_peft_step(model, compiled), batches,
                                              args, device)
                        else:
                            model = build(variant, overrides, args, train, compiled, checkpoint)
                            row = bench_steps(f"{variant} (K={model.num_experts}), {mode}", model_step(model), batches,
                                              args, device)
                    except torch.OutOfMemoryError:
                        row = {"variant": f"{variant}, {mode}", "fits": False}
                    model = None
                    rows.append({"micro_batch": batch_size, **row, "samples_per_s": row.get("step_ms") and
                                 1000 * batch_size / row["step_ms"]})
                    reset_peak(device)
    if args.liger and device.type != "cuda":
        rows.append({"variant": "iLoRA (K=4), eager + liger-kernel: skipped (Triton kernels need a GPU)"})
    elif args.liger:
        batches = first_batches(train, args.warmup + args.steps)
        model = build("iLoRA", overrides, args, train)
        apply_liger(model)
        rows.append(bench_steps("iLoRA (K=4), eager + liger-kernel", model_step(model), batches, args, device))
        del model
    return rows


# ------------------------------------------------------------------------------------------- evaluation
def eval_batches(test, users, device):
    batches, seen = [], 0
    for batched in test:
        batches.append(batched[0].to(device))
        seen += int(batched[1].max()) + 1
        if seen >= users:
            break
    return batches, seen


def warm_up_and_time(fn, batches, device) -> dict:
    """Warm-up on the first and last batch (every batch size), then ``fn`` over all batches, timed."""
    warm = batches[:1] if len(batches) == 1 else [batches[0], batches[-1]]
    warmup_s, _ = timed(lambda: [fn(b) for b in warm], device)
    graphs = compiled_graphs()
    seconds, out = timed(lambda: [fn(b) for b in batches], device)
    return {"seconds": seconds, "warmup_s": warmup_s, "compiles_while_timed": compiled_graphs() - graphs, "out": out}


@torch.no_grad()
def bench_eval(overrides, args, train, test, device):
    rows, scores = [], {}
    batches, users = eval_batches(test, args.eval_users, device)
    for compiled in compile_modes(args):
        model = build("iLoRA", overrides, args, train, compiled).eval()
        run = warm_up_and_time(model.predict, batches, device)
        scores[compiled] = torch.cat(run.pop("out"))
        rows.append({"variant": f"uni19 packed scoring, {'compiled' if compiled else 'eager'}",
                     "attention": attention_used(model, device, many_candidates=False)["attention"], "users": users,
                     "users_per_s": users / run["seconds"], **run})
    if len(scores) == 2:
        rows[-1]["max_abs_diff_vs_eager"] = float((scores[True] - scores[False]).abs().max())
    gen, gen_users = eval_batches(test, args.generate_users, device)
    run = warm_up_and_time(lambda b: model.generate_answers(b, args.max_new_tokens), gen, device)
    run.pop("out")
    rows.append({"variant": f"uni19 greedy generation, {args.max_new_tokens} new tokens (eager)", "users": gen_users,
                 "users_per_s": gen_users / run["seconds"], **run})
    best = max(row["users_per_s"] for row in rows[:-1])
    rows.append({"variant": "scoring / generation speed", "users_per_s": best / rows[-1]["users_per_s"]})
    return rows


# ------------------------------------------------------------------------------------------ full ranking
def user_rows(test, count=None):
    """One interaction row (history) per test user; with ``count``, cycled to exactly that many users."""
    rows = [batched[0][torch.nonzero(torch.diff(batched[1], prepend=batched[1][:1] - 1)).squeeze(1)] for batched in test]
    users = cat_interactions(rows)
    return users if count is None else users[torch.arange(count) % len(users)]


def attention_used(model, device, many_candidates: bool = True) -> dict:
    """How the scorer applies its packing mask on ``device`` (to a full ranking's candidates, or to a uniN list:
    ``many_candidates`` False), and how many candidate tokens follow a prompt copy."""
    flex = model.scorer.uses_flex(device, many_candidates)
    return {"attention": "flex" if flex else "dense",
            "pack_tokens": model.scorer.pack_tokens or ("all" if flex else DENSE_PACK_TOKENS)}


def rank_all(model, users, args, device, compare: bool = True) -> dict:
    n = len(users)
    chunks = [users[torch.arange(i, min(i + args.fullrank_batch_users, n))] for i in range(0, n, args.fullrank_batch_users)]
    run = warm_up_and_time(lambda c: model.full_sort_predict(c.to(device)), chunks, device)
    scores = run.pop("out")
    if compare and model.scorer.uses_flex(device):  # the first batch again under the dense mask (not timed)
        attention, model.scorer.attention = model.scorer.attention, "dense"
        try:
            dense = model.full_sort_predict(chunks[0].to(device))
        finally:
            model.scorer.attention = attention
        run["max_abs_diff_vs_dense"] = float((scores[0][:, 1:] - dense[:, 1:]).abs().max())
    return run


@torch.no_grad()
def bench_fullrank(overrides, args, train, test, device):
    compiled = compile_modes(args)[-1]
    model = build("iLoRA", overrides, args, train, compiled).eval()
    users = user_rows(test)
    if args.fullrank_users:
        users = users[torch.arange(min(args.fullrank_users, len(users)))]
    mode = "compiled" if compiled else "eager"
    rows = [{"variant": f"full ranking, {args.dataset} test users, {mode}", **attention_used(model, device),
             "users": len(users), "items": model.n_items - 1, "extrapolated": False, **rank_all(model, users, args, device)}]
    if args.fullrank_floor:
        with model.llm.disable_adapter():
            floor = rank_all(model, users, args, device, compare=False)
        rows.append({"variant": f"full ranking, {args.dataset} test users, {mode}, adapters off (the floor)",
                     **attention_used(model, device), "users": len(users), "items": model.n_items - 1,
                     "extrapolated": False, **floor})
    # ml-1m-sized catalogue: items 1..n are the real ones (real histories keep their titles and behavioural
    # tokens), the rest cycle real titles with a suffix; candidates are the whole synthetic catalogue.
    titles = model.prompt.titles[1:]
    synthetic = [""] + [titles[i % len(titles)] + ("" if i < len(titles) else f" {i // len(titles) + 1}")
                        for i in range(args.synthetic_items)]
    config = Config(model="iLoRA", dataset=args.dataset, config_dict=overrides)
    templates = load_templates(config["prompt_file"], config["prompt_domain"])
    model.prompt = model.scorer.prompt = PromptBuilder(
        model.prompt.tokenizer, synthetic, templates, candidate_counts(config), config["max_title_tokens"],
        pad_to_multiple_of=model.prompt.pad_to_multiple_of).to(device)
    model.n_items = args.synthetic_items + 1
    measure = min(args.synthetic_users, args.synthetic_measure_users)
    run = rank_all(model, user_rows(test, measure), args, device)
    run["seconds"] *= args.synthetic_users / measure
    rows.append({"variant": f"full ranking, ml-1m size, {mode}", **attention_used(model, device), "users": args.synthetic_users,
                 "items": args.synthetic_items, "extrapolated": measure < args.synthetic_users,
                 "measured_users": measure, **run})
    return rows


# ------------------------------------------------------------------------------------------------ memory
def bench_memory(overrides, args, train, device):
    rows, batch = [], args.batch_size
    model = build("iLoRA", overrides, args, train)
    step = model_step(model)
    while batch <= args.max_memory_batch:
        reset_peak(device)
        batches = [cat_interactions(first_batches(train, -(-batch // args.batch_size)))[torch.arange(batch)]]
        try:
            seconds, _ = timed(lambda: step(batches[0]), device)
        except torch.OutOfMemoryError:
            rows.append({"llm": args.llm_path, "batch_size": batch, "fits": False})
            break
        rows.append({"llm": args.llm_path, "batch_size": batch, "fits": True, "peak_gib": peak_gib(device),
                     "step_s": seconds})
        batch *= 2
    return rows


def main(argv=None):
    args = parse_args(argv)
    apply_torch_config(args.torch_config)
    sections = args.sections.split(",")
    overrides, config, train, test = setup(args)
    device = torch.device(config["device"])
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "llm_path": args.llm_path, "dtype": str(resolve_dtype(config["llm_dtype"], device)),
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(json.dumps(report), flush=True)
    if "train" in sections:
        report_section(report, "train", bench_training(overrides, args, train, device), args)
    if "eval" in sections:
        report_section(report, "eval", bench_eval(overrides, args, train, test, device), args)
    if "fullrank" in sections:
        report_section(report, "fullrank", bench_fullrank(overrides, args, train, test, device), args)
    if "memory" in sections:
        report_section(report, "memory", bench_memory(overrides, args, train, device), args)
    print(f"\nwritten: {args.out}")
    return report


if __name__ == "__main__":
    main()
