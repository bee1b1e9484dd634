"""torch.profiler view of iLoRA training steps or scoring (what limits throughput).

    python benchmarks/profile_step.py --llm_path=smollm2-135m --batch_size=32              # training steps
    python benchmarks/profile_step.py --llm_path=smollm2-135m --section eval --compile=only  # scoring

``--section eval`` profiles uni19 ``predict`` batches (``--eval_users`` users, ``--eval_batch_users``
per batch) and one ``full_sort_predict`` chunk (``--fullrank_batch_users`` users, every item), after
one warm-up pass over the same inputs (with ``--compile``: every shape compiled before profiling).
Each part prints the operators sorted by self device time (on GPU) and by CPU time, and the calls
that make the host wait for the device: an operator whose result size or value the CPU must read
(``.item()``/``int()``, boolean-mask indexing, ``nonzero``, copies to the host) or an explicit CUDA
synchronisation. Other options are those of ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import apply_torch_config, build, eval_batches, first_batches, model_step, parse_args, setup, user_rows  # noqa: E402

# Operators that make the host wait for the device (on GPU): scalar reads (.item(), int(), bool()) and
# data-dependent output sizes (boolean-mask indexing, nonzero). On GPU, the CUDA runtime's
# synchronisation calls count every wait, .tolist() and other copies to the host included.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profiled(fn, title: str) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    averages = prof.key_averages()
    print(f"\n==== {title}")
    if torch.cuda.is_available():
        print("\n-- by self CUDA time")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print("\n-- by CPU time")
    print(averages.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    counts = {row.key: row.count for row in averages if row.key in HOST_SYNC_OPS + CUDA_SYNC_CALLS}
    print("\n-- host-device syncs (calls): "
          + (", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"))
    if not torch.cuda.is_available():
        print("   (operators only: on CPU a .tolist() is not an operator; on GPU cudaStreamSynchronize counts it)")


def profile_training(model, train, args) -> None:
    step = model_step(model)
    batches = first_batches(train, 6)
    for batch in batches[:3]:
        step(batch)
    profiled(lambda: [step(batch) for batch in batches[3:]], "training steps")


@torch.no_grad()
def profile_eval(model, test, args, device) -> None:
    model.eval()
    batches, users = eval_batches(test, args.eval_users, device)
    for batch in batches:  # warm-up: every prompt width (and compilation) before profiling
        model.predict(batch)
    profiled(lambda: [model.predict(batch) for batch in batches], f"uni19 predict: {users} users, {len(batches)} batches")

    chunk = user_rows(test)[torch.arange(args.fullrank_batch_users)].to(device)
    model.full_sort_predict(chunk)
    profiled(lambda: model.full_sort_predict(chunk),
             f"full_sort_predict: {args.fullrank_batch_users} users x {model.n_items - 1} items")


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--section", choices=("train", "eval"), default="train")
    parser.add_argument("--model", default="iLoRA", help="iLoRA, LLaRA or TALLRec")
    own, rest = parser.parse_known_args(argv)
    args = parse_args(rest)
    apply_torch_config(args.torch_config)
    overrides, config, train, test = setup(args)
    device = torch.device(config["device"])
    model = build(own.model, overrides, args, train, compiled=args.compile == "only")
    if own.section == "train":
        profile_training(model, train, args)
    else:
        profile_eval(model, test, args, device)


if __name__ == "__main__":
    main()
