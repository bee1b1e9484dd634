"""How much bf16 alone moves full-ranking scores: flex (one pack) and dense packs of 1024 against dense packs of 2048.

The same scores computed in another grouping differ in bf16 by rounding only; this puts flex's difference from the
dense mask beside the difference of the dense mask from itself at another pack size, on two ml-100k test users, the
real LLM, untrained adapter (runs on a CPU in a few minutes):

    python benchmarks/fullrank_bf16_noise.py --llm_path=smollm2-135m --dtype=bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the benchmark's setup and model builder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm_path", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--users", type=int, default=2)
    args = parser.parse_args(argv)
    bench_args = throughput.parse_args([f"--llm_path={args.llm_path}", "--sections=fullrank",
                                        f'--settings={{"llm_dtype": "{args.dtype}"}}'])
    overrides, _, train, test = throughput.setup(bench_args)
    model = throughput.build("iLoRA", overrides, bench_args, train).eval()
    users = throughput.user_rows(test)[torch.arange(args.users)]
    scores = {}
    with torch.no_grad():
        for name, attention, pack_tokens in (("flex", "flex", None), ("dense 1024", "dense", 1024),
                                             ("dense 2048", "dense", None)):
            model.scorer.attention, model.scorer.pack_tokens = attention, pack_tokens
            scores[name] = model.full_sort_predict(users)[:, 1:].float()
    reference = scores["dense 2048"]
    print(f"{args.dtype}, {args.users} users x {reference.shape[1]} items, scores in "
          f"[{reference.min():.1f}, {reference.max():.1f}]")
    for name in ("flex", "dense 1024"):
        difference = (scores[name] - reference).abs()
        top, top_reference = scores[name].topk(10).indices, reference.topk(10).indices
        overlap = (top[:, :, None] == top_reference[:, None, :]).any(2).float().mean()
        print(f"{name} vs dense 2048: max |diff| {difference.max():.3f}, mean {difference.mean():.3f}, "
              f"top-10 overlap {overlap:.2f}")


if __name__ == "__main__":
    main()
