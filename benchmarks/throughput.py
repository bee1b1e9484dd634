"""Speed of iLoRA against LLaRA and stock peft LoRA, in one process, on one LLM and real prompts.

    python benchmarks/throughput.py                                   # CPU smoke: tiny-random-llama
    python benchmarks/throughput.py --llm_path=smollm2-135m --compile  # GPU: the numbers in the README

Sections (``--sections``):
- ``train``: optimiser steps (forward + backward + AdamW) on the same real ml-100k prompts for iLoRA (K
  experts, gated), LLaRA (K=1) and stock peft LoRA on the same token batches with transformers' own loss
  (``labels=``, full-vocabulary logits at every position, no gate, no behavioural tokens): the floor of
  what LoRA costs. Median of ``--steps`` steps after ``--warmup``; samples/s, tokens/s, peak memory.
- ``eval``: uni19 users/s with prefix-cached packed candidate scoring (what ``predict`` does), scoring
  every candidate after its own full prompt (no cache), and greedy generation (the authors' protocol,
  ``--max_new_tokens``). Also checks that the cached and uncached scores agree.
- ``fullrank``: seconds to score every item for every ml-100k test user, and for a synthetic catalogue
  of ml-1m's size (``--synthetic_users`` x ``--synthetic_items``, titles drawn from real ml-100k titles
  so their token lengths are realistic). ``--synthetic_measure_users`` limits the users actually scored;
  the total is then extrapolated linearly (users are independent) and marked as such.

``--compile`` compiles the LLM's decoder (``iLoRA.compile_llm``: batch and sequence dims dynamic, one
graph each for training, prompt encoding and packed scoring). Compilation happens in the warm-up:
training runs ``--warmup`` steps; evaluation and full ranking warm up on their first and last batch
(every batch size they time; widths are dynamic) and report those seconds as ``warmup_s``, apart from
the timed ``seconds``. ``compiles_while_timed`` counts graphs dynamo compiled inside the timed part
(0 expected). Greedy generation stays eager: HF ``generate`` calls the uncompiled module.

Prints one Markdown table and writes everything as JSON (``--out``).
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
from recbole.utils import init_seed  # noqa: E402

from recbole_ilora.config import Config  # noqa: E402
from recbole_ilora.model.ilora import iLoRA  # noqa: E402
from recbole_ilora.model.llara import LLaRA  # noqa: E402
from recbole_ilora.prompt import ANSWER, PromptBuilder, load_templates  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_path", default="tiny-random-llama")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--sections", default="train,eval,fullrank")
    parser.add_argument("--batch_size", type=int, default=32, help="training prompts per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the LLM (all variants)")
    parser.add_argument("--eval_users", type=int, default=256, help="uni19 users per evaluation variant")
    parser.add_argument("--eval_batch_users", type=int, default=64)
    parser.add_argument("--nocache_users", type=int, default=64)
    parser.add_argument("--generate_users", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--fullrank_batch_users", type=int, default=64)
    parser.add_argument("--fullrank_users", type=int, default=None, help="limit the real test users (default all)")
    parser.add_argument("--score_pack_tokens", type=int, default=512)
    parser.add_argument("--synthetic_users", type=int, default=6040)
    parser.add_argument("--synthetic_items", type=int, default=3706)
    parser.add_argument("--synthetic_measure_users", type=int, default=None)
    parser.add_argument("--out", default="results/benchmark.json")
    return parser.parse_args(argv)


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


def warm_up_and_time(fn, batches, args, device) -> dict:
    """Warm-up (compiled: the first and last batch, i.e. every batch size), then ``fn`` over all batches, timed."""
    warm = batches[:1] if not args.compile or len(batches) == 1 else [batches[0], batches[-1]]
    warmup_s, _ = timed(lambda: [fn(b) for b in warm], device)
    graphs = compiled_graphs()
    seconds, out = timed(lambda: [fn(b) for b in batches], device)
    return {"seconds": seconds, "warmup_s": warmup_s, "compiles_while_timed": compiled_graphs() - graphs, "out": out}


def setup(args):
    overrides = {
        "llm_path": args.llm_path,
        "gate_sasrec": {"epochs": 1, "hidden_size": 64, "inner_size": 256, "train_batch_size": 512},
        "train_batch_size": args.batch_size,
        "eval_batch_size": 20 * args.eval_batch_users,
        "curriculum": False,  # every step with behavioural tokens: the heavier, steady case
        "score_pack_tokens": args.score_pack_tokens,
        "pad_to_multiple_of": 8,  # compiled too: widths are dynamic dims, wider padding would only add tokens
        "show_progress": False,
        "state": "WARNING",
        "checkpoint_dir": "saved",
    }
    config = Config(model="iLoRA", dataset=args.dataset, config_dict=overrides)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    return overrides, config, train, test


def build(model_class, overrides, args, train, **changes):
    config = Config(model=model_class.__name__, dataset=args.dataset, config_dict={**overrides, **changes})
    init_seed(config["seed"], True)
    model = model_class(config, train._dataset).to(config["device"])
    if args.compile:
        model.compile_llm()
    return model


def train_batches(train, count):
    batches = []
    for interaction in train:
        batches.append(interaction)
        if len(batches) == count:
            return batches
    return batches


# ------------------------------------------------------------------------------------------- training
def bench_training(name, step_fn, batches, args, device, tokens_fn):
    reset_peak(device)
    times, tokens, warmup_s = [], 0, 0.0
    for i in range(args.warmup + args.steps):
        seconds, _ = timed(lambda: step_fn(batches[i % len(batches)]), device)
        if i >= args.warmup:
            times.append(seconds)
            tokens += int(tokens_fn())
        else:
            warmup_s += seconds
    median = statistics.median(times)
    mean_tokens = tokens / args.steps
    return {
        "variant": name, "step_ms": 1000 * median, "samples_per_s": args.batch_size / median,
        "tokens_per_s": mean_tokens / median, "tokens_per_step": mean_tokens, "peak_gib": peak_gib(device),
        "warmup_s": warmup_s,
    }


def model_step(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=next(model.parameters()).is_cuda)
    model.train()

    def step(interaction):
        loss = model.calculate_loss(interaction.to(model.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def stock_peft_step(model, args):
    """Stock peft LoRA on the same prompts: HF loss via labels=, no gate, text only (placeholders = pad ids)."""
    llm = model.llm
    if args.compile:
        llm = torch.compile(llm)
    optimizer = torch.optim.AdamW([p for p in model.llm.parameters() if p.requires_grad], lr=1e-4,
                                  fused=next(model.parameters()).is_cuda)
    state = {"tokens": torch.zeros(())}

    def step(interaction):
        interaction = interaction.to(model.device)
        history, present = model._recent_history(interaction)
        target = interaction[model.POS_ITEM_ID]
        candidates = model._training_candidates(target, history)
        template = torch.zeros_like(target)
        prompts = model.prompt.build(history, present, candidates, template, True, target=target)
        labels = torch.where(prompts.kind == ANSWER, prompts.input_ids, -100)
        state["tokens"] = prompts.lengths.sum()
        with model._gated(None):  # autocast only (LLaRA has no gate)
            loss = llm(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask.long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda: state["tokens"]


# ------------------------------------------------------------------------------------------ evaluation
def eval_batches(test, users, device):
    batches, seen = [], 0
    for batched in test:
        batches.append(batched[0].to(device))
        seen += int(batched[1].max()) + 1
        if seen >= users:
            break
    return batches, seen


@torch.no_grad()
def score_without_cache(model, interaction):
    """Each candidate after its own full prompt: G*C sequences of prompt + answer, answer-only log-probs."""
    group, slot, first_row, items, present = model._group_rows(interaction)
    users = interaction[first_row]
    history, history_present = model._recent_history(users)
    order = model._prompt_order(users[model.USER_ID], items, present)
    shown = torch.gather(items, 1, order)
    candidates = items.shape[1]
    repeat = lambda t: t.repeat_interleave(candidates, 0)  # noqa: E731
    prompts = model.prompt.build(repeat(history), repeat(history_present), repeat(shown),
                                 torch.zeros(items.numel(), dtype=torch.long, device=items.device),
                                 model.use_behaviour_tokens, target=items.reshape(-1))
    user_repr = model._user_repr(users)
    with model._gated(None if user_repr is None else repeat(user_repr)):
        hidden = model._decode(inputs_embeds=model._input_embeddings(prompts),  # compiled with --compile
                               attention_mask=prompts.attention_mask.long()).last_hidden_state
        predicts = prompts.kind[:, 1:] == ANSWER
        log_probs = -torch.nn.functional.cross_entropy(
            model.lm_head(hidden[:, :-1][predicts]).float(), prompts.input_ids[:, 1:][predicts], reduction="none")
    rows = torch.arange(items.numel(), device=items.device)[:, None].expand_as(predicts)[predicts]
    total = torch.zeros(items.numel(), device=items.device).index_add_(0, rows, log_probs)
    scores = (total / predicts.sum(1).clamp(min=1)).view(items.shape)
    return scores[group, slot]


def bench_eval(model, test, args, device):
    model.eval()
    results = []
    batches, users = eval_batches(test, args.eval_users, device)
    with torch.no_grad():
        run = warm_up_and_time(model.predict, batches, args, device)
    results.append({"variant": "uni19, prefix-cached packed scoring", "users": users, **_timing(run, users)})

    small, small_users = eval_batches(test, args.nocache_users, device)
    with torch.no_grad():
        run = warm_up_and_time(lambda b: score_without_cache(model, b), small, args, device)
        reference = [model.predict(b) for b in small]
    agreement = max(float((p - r).abs().max()) for p, r in zip(run["out"], reference))
    results.append({"variant": "uni19, full prompt per candidate (no cache)", "users": small_users,
                    **_timing(run, small_users), "max_abs_score_diff": agreement})

    gen, gen_users = eval_batches(test, args.generate_users, device)
    run = warm_up_and_time(lambda b: model.generate_answers(b, args.max_new_tokens), gen, args, device)
    results.append({"variant": f"uni19, greedy generation ({args.max_new_tokens} new tokens, eager)",
                    "users": gen_users, **_timing(run, gen_users)})
    return results


def _timing(run: dict, users: int) -> dict:
    return {"seconds": run["seconds"], "users_per_s": users / run["seconds"], "warmup_s": run["warmup_s"],
            "compiles_while_timed": run["compiles_while_timed"]}


# ---------------------------------------------------------------------------------------- full ranking
def user_rows(test, count=None):
    """One interaction row (history) per test user; with ``count``, cycled to exactly that many users."""
    rows = [batched[0][torch.nonzero(torch.diff(batched[1], prepend=batched[1][:1] - 1)).squeeze(1)] for batched in test]
    from recbole.data.interaction import cat_interactions

    users = cat_interactions(rows)
    return users if count is None else users[torch.arange(count) % len(users)]


@torch.no_grad()
def bench_fullrank(model, test, args, device):
    model.eval()
    results = []
    users = user_rows(test)
    if args.fullrank_users:
        users = users[torch.arange(min(args.fullrank_users, len(users)))]
    n = len(users)
    chunks = [users[torch.arange(i, min(i + args.fullrank_batch_users, n))] for i in range(0, n, args.fullrank_batch_users)]
    run = warm_up_and_time(lambda c: model.full_sort_predict(c.to(device)), chunks, args, device)
    results.append({"variant": f"full ranking, {args.dataset} test users", "users": n, "items": model.n_items - 1,
                    "seconds": run["seconds"], "extrapolated": False, "warmup_s": run["warmup_s"],
                    "compiles_while_timed": run["compiles_while_timed"]})

    # Synthetic ml-1m-sized catalogue: real titles (so realistic token lengths) cycled with a suffix.
    titles = model.prompt.titles[1:]
    synthetic = [""] + [f"{titles[i % len(titles)]}" + ("" if i < len(titles) else f" {i // len(titles) + 1}")
                        for i in range(args.synthetic_items)]
    real_prompt, real_items = model.prompt, model.n_items
    templates = load_templates(model.config["prompt_file"], model.config["prompt_domain"])
    model.prompt = PromptBuilder(real_prompt.tokenizer, synthetic, templates, model.num_candidates,
                                 model.config["max_title_tokens"], pad_to_multiple_of=real_prompt.pad_to_multiple_of).to(device)
    # Items 1..n of the synthetic catalogue are the real ones, so real histories keep their titles and
    # behavioural tokens; candidates are the whole synthetic catalogue.
    model.n_items = args.synthetic_items + 1
    measure = min(args.synthetic_users, args.synthetic_measure_users or args.synthetic_users)
    synthetic_users = user_rows(test, measure)
    chunks = [synthetic_users[torch.arange(i, min(i + args.fullrank_batch_users, measure))]
              for i in range(0, measure, args.fullrank_batch_users)]
    run = warm_up_and_time(lambda c: model.full_sort_predict(c.to(device)), chunks, args, device)
    total = run["seconds"] * args.synthetic_users / measure
    results.append({"variant": f"full ranking, synthetic ml-1m size", "users": args.synthetic_users,
                    "items": args.synthetic_items, "seconds": total, "measured_users": measure,
                    "extrapolated": measure < args.synthetic_users, "warmup_s": run["warmup_s"],
                    "compiles_while_timed": run["compiles_while_timed"]})
    model.prompt, model.n_items = real_prompt, real_items
    return results


def main(argv=None):
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    overrides, config, train, test = setup(args)
    device = torch.device(config["device"])
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "llm_path": args.llm_path, "dtype": str(_dtype(config, device)), "compiled": args.compile,
              "batch_size": args.batch_size, "torch": torch.__version__, "train": [], "eval": [], "fullrank": []}
    batches = train_batches(train, args.warmup + args.steps)

    ilora = build(iLoRA, overrides, args, train, num_experts=args.num_experts)
    if "train" in sections:
        report["train"].append(bench_training(f"iLoRA (K={args.num_experts})", model_step(ilora), batches, args,
                                              device, lambda: ilora.last_batch_tokens))
    if "eval" in sections:
        report["eval"] = bench_eval(ilora, test, args, device)
    if "fullrank" in sections:
        report["fullrank"] = bench_fullrank(ilora, test, args, device)
    del ilora
    if "train" in sections:
        llara = build(LLaRA, overrides, args, train)
        report["train"].append(bench_training("LLaRA (K=1)", model_step(llara), batches, args, device,
                                              lambda: llara.last_batch_tokens))
        del llara
        uncompiled = argparse.Namespace(**{**vars(args), "compile": False})  # stock_peft_step compiles the whole LLM
        plain = build(LLaRA, overrides, uncompiled, train)
        step, tokens = stock_peft_step(plain, args)
        report["train"].append(bench_training("stock peft LoRA (HF loss, no gate)", step, batches, args, device, tokens))
        ilora_speed = report["train"][0]["tokens_per_s"]
        report["train_ratio_ilora_over_llara"] = ilora_speed / report["train"][1]["tokens_per_s"]

    if report["eval"]:
        generation = report["eval"][2]["users_per_s"]
        report["eval_speedup_cached_over_generation"] = report["eval"][0]["users_per_s"] / generation
    print_report(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.out}")
    return report


def _dtype(config, device):
    from recbole_ilora.model.ilora import _resolve_dtype

    return _resolve_dtype(config["llm_dtype"], device)


def print_report(report):
    import pandas as pd

    print(f"\n{report['device']} | {report['llm_path']} | {report['dtype']} | compiled={report['compiled']} | "
          f"torch {report['torch']}")
    for section in ("train", "eval", "fullrank"):
        if report[section]:
            print()
            print(pd.DataFrame(report[section]).to_markdown(index=False, floatfmt=".4g"))
    for key in ("train_ratio_ilora_over_llara", "eval_speedup_cached_over_generation"):
        if key in report:
            print(f"{key}: {report[key]:.3f}")


if __name__ == "__main__":
    main()
