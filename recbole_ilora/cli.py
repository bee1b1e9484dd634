"""Command line of ``run_recbole_ilora.py``.

Accepts what RecBole's ``run_recbole.py`` accepts -- ``--model``, ``--dataset``, ``--config_files``
(space-separated YAML paths) and any RecBole setting as ``--key=value`` -- plus the plugin's own
sub-commands. Overrides are converted with RecBole's own rules (``--epochs=3`` is an int,
``--topk="[1,5]"`` a list) and take precedence over every YAML file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from recbole_ilora.overrides import OverrideError, parse_overrides, parse_with_overrides  # noqa: F401 - also imported from here
from recbole_ilora.settings import help_text

EPILOG = """\
Leaderboard (grid of models x datasets x seeds, resumable, exported as Markdown/CSV/LaTeX/JSON/PNG):
  run_recbole_ilora.py --leaderboard properties/leaderboard.yaml
  run_recbole_ilora.py --leaderboard properties/leaderboard.yaml --export_only
  run_recbole_ilora.py --leaderboard GRID.yaml --jobs=4     # 4 shard processes sharing the device
Several processes (DDP: gloo on CPU, nccl on GPU; train_batch_size stays the global batch):
  run_recbole_ilora.py --model=iLoRA --dataset=ml-100k --nproc=4 --gpu_id=0,1,2,3
  torchrun --nproc_per_node=4 run_recbole_ilora.py --model=iLoRA --dataset=ml-100k
Any other RecBole setting is given as --key=value, e.g.
  run_recbole_ilora.py --model=SASRec --dataset=ml-100k --epochs=5 --train_batch_size=512
  run_recbole_ilora.py --model=SASRec --dataset=ml-100k --eval_args="{'mode': 'full'}"
Settings are merged over RecBole's defaults, then properties/overall.yaml, properties/model/<model>.yaml,
properties/dataset/<dataset>.yaml, then --config_files, then these overrides; a partial dict setting
(--eval_args="{'mode': 'full'}") merges into the defaults. Outputs go under --output_root (default outputs/).
Resume an interrupted LLM run from its checkpoint: --resume=PATH (the path is printed when it stops).
"""


class OneLineParser(argparse.ArgumentParser):
    """Errors as one line (the usage is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="run_recbole_ilora.py",
        description="Train and test RecBole models and the iLoRA plugin models (iLoRA, LLaRA, TALLRec).",
        epilog=EPILOG + "\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", "-m", default=None,
                        help="model name, required: a plugin model (iLoRA, LLaRA, TALLRec) or any RecBole model (SASRec, ...)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default ml-100k, which ships with RecBole)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML config files")
    parser.add_argument("--no_save", action="store_true", help="do not save checkpoints (tests the last model)")
    leaderboard = parser.add_argument_group(
        "leaderboard",
        "run a grid of models x datasets x seeds instead of one model (--model and --dataset are then "
        "ignored; --config_files, --no_save and every --key=value apply to every cell)",
    )
    leaderboard.add_argument("--leaderboard", metavar="GRID.yaml", default=None,
                             help="grid file, e.g. properties/leaderboard.yaml; reruns resume unfinished cells")
    leaderboard.add_argument("--results", metavar="PATH", default=None,
                             help="results JSON-lines file (default <output_dir>/results.jsonl); "
                                  "the exports are written beside it")
    leaderboard.add_argument("--export_only", action="store_true",
                             help="write the tables and plot from the results file without running any cell")
    leaderboard.add_argument("--jobs", type=int, default=None, metavar="N",
                             help="run the grid as N shard processes in parallel (small LLMs leave a GPU mostly "
                                  "idle: several cells can share it), each logging to <output_dir>/shard-I.log; "
                                  "exports once all have finished")
    leaderboard.add_argument("--run_id", default=None,
                             help="with --shard: shards given the same id take the next free cell instead of "
                                  "every N-th (set by --jobs)")
    leaderboard.add_argument("--shard", metavar="I/N", default=None,
                             help="run the I-th of N shares of the cells (0-based; N processes, e.g. on one GPU "
                                  "or one per GPU) appending to one results file; then --export_only")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args, overrides = parse_with_overrides(parser, argv)

    import recbole_ilora  # noqa: F401 - applies the compatibility fixes before RecBole is used
    from recbole_ilora.config import ConfigError
    from recbole_ilora.data import DatasetError

    config_files = args.config_files.strip().split(" ") if args.config_files else None
    if args.jobs is not None:
        if args.leaderboard is None or args.shard is not None or args.export_only:
            parser.error("--jobs runs a --leaderboard grid in parallel; it does not combine with --shard or --export_only.")
        if args.jobs < 1:
            parser.error("--jobs must be at least 1.")
        from recbole_ilora.leaderboard import GridSpecError, run_leaderboard_jobs

        argv = list(argv) if argv is not None else sys.argv[1:]
        try:
            return run_leaderboard_jobs(args.leaderboard, args.jobs, argv, results_path=args.results,
                                        cli_overrides=overrides, config_files=config_files)
        except GridSpecError as error:
            parser.error(f"{args.leaderboard}: {error}")
    if args.leaderboard is not None:
        from recbole_ilora.leaderboard import GridSpecError, run_leaderboard

        try:
            return run_leaderboard(
                args.leaderboard,
                results_path=args.results,
                cli_overrides=overrides,
                config_files=config_files,
                saved=not args.no_save,
                export_only=args.export_only,
                shard=args.shard,
                run_id=args.run_id,
            )
        except GridSpecError as error:
            parser.error(f"{args.leaderboard}: {error}")
    if args.results is not None or args.export_only or args.shard is not None or args.jobs is not None:
        parser.error("--results, --export_only, --shard and --jobs only apply with --leaderboard GRID.yaml.")
    if args.model is None:
        parser.error("--model is required: e.g. --model=iLoRA (LLaRA, TALLRec) or any RecBole model (--model=SASRec).")
    # distributed: --nproc=N (mp.spawn, RecBole's settings nproc/world_size/ip/port/group_offset) or torchrun.
    from recbole_ilora.launch import run_from_command_line

    try:
        return run_from_command_line(args.model, args.dataset, config_files, overrides, saved=not args.no_save)
    except (ConfigError, DatasetError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def console_entry_point() -> int:
    """The ``run_recbole_ilora`` command: :func:`main` without its return value (a non-None value would be
    printed by the console-script wrapper and turned into exit status 1)."""
    main()
    return 0
