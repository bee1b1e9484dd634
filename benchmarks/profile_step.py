"""torch.profiler view of iLoRA training steps and uni19 scoring (what limits throughput).

    python benchmarks/profile_step.py --llm_path=smollm2-135m --batch_size=32
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import build, model_step, parse_args, setup, train_batches  # noqa: E402

from recbole_ilora.model.ilora import iLoRA  # noqa: E402


def main():
    args = parse_args()
    overrides, config, train, test = setup(args)
    model = build(iLoRA, overrides, args, train, num_experts=args.num_experts)
    step = model_step(model)
    batches = train_batches(train, 6)
    for batch in batches[:3]:
        step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for batch in batches[3:]:
            step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
