"""Command line of the analysis: ``python -m recbole_ilora.analysis --checkpoint=PATH ... --out=DIR``.

Its own options, then any RecBole setting as ``--key=value`` (typed by RecBole's rules, as
``run_recbole_ilora.py`` does), applied over every checkpoint's own settings.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from recbole_ilora.analysis.pipeline import analyze
from recbole_ilora.overrides import parse_with_overrides

EPILOG = """\
Example (LLaRA and iLoRA trained on ml-100k with run_recbole_ilora.py, checkpoints in saved/):
  python -m recbole_ilora.analysis --checkpoint=saved/LLaRA-....pth --checkpoint=saved/iLoRA-....pth \\
      --clusters=8 --samples_per_cluster=64 --out=results/analysis-ml-100k
Any RecBole setting may follow as --key=value (e.g. --gpu_id=1, --checkpoint_dir=saved when the gate
encoder cache has moved).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_ilora.analysis",
        description="Gradient similarity between user clusters, gate weights per cluster and per-cluster test "
                    "metrics of trained LLaRA/iLoRA checkpoints (the analyses of Kong et al., NeurIPS 2024).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                        help="a training checkpoint (.pth); give it twice to compare two models of one dataset; "
                             "the first one's frozen SASRec defines the clusters")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--clusters", type=int, default=8, metavar="K", help="number of user clusters (default 8)")
    parser.add_argument("--samples_per_cluster", type=int, default=64, metavar="N",
                        help="training prompts per cluster for its gradient (default 64)")
    parser.add_argument("--batch_size", type=int, default=None, metavar="B",
                        help="prompts per forward/backward pass of the gradients (default: the run's train_batch_size)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args, overrides = parse_with_overrides(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    summary = analyze(
        args.checkpoint, args.out, num_clusters=args.clusters, samples_per_cluster=args.samples_per_cluster,
        overrides=overrides, batch_size=args.batch_size, show_progress=not args.no_progress,
    )
    print(f"Analysis written to {args.out} (summary.md, summary.json, {len(summary['files']) - 2} tables and figures).")
    return summary
