"""The `npo` command: `npo train` (also `python -m npo_engine.train` and `torchrun ... -m npo_engine.train`)
and `npo plot RUN_DIR`.

Exit codes of `npo train`: 0 when the run completed; 2 for a config error; 1 for any other error the user fixes
(a run directory in use or holding another run, a damaged checkpoint, a run stopped for non-finite steps), which
is printed as one line without a traceback; 128 + N when signal N (SIGINT 130, SIGTERM 143) stopped the run after
saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from npo_engine.config import ConfigError, describe_fields, dump_config, load_config
from npo_engine.errors import UserError


def _train_parser(prog: str = "npo train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a policy with GRPO-family RL on verifiable rewards. With no arguments: the built-in "
        "tiny demo model on synthetic arithmetic, on this machine's CPU or first GPU.",
        epilog="config keys (set in --config YAML as section: {key: value}, or as section.key=value):\n\n"
        + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML file of config sections (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, applied after --config, e.g. algo.clip_high=0.28")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory from its newest intact checkpoint; only "
                        "run.steps, logging and checkpoint cadence (and a few more) may differ from its config")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a run directory that holds one, moving the old run to "
                        "<run-dir>.old-<timestamp> (nothing is deleted)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: run.runs_dir/run.name)")
    return parser


def train_main(argv: list[str] | None = None, prog: str = "npo train") -> int:
    args = _train_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from npo_engine.distributed import shutdown_distributed
    from npo_engine.stopping import TrainingStopped

    try:
        from npo_engine.trainer import Trainer

        trainer = Trainer(cfg, run_dir=args.run_dir, resume=args.resume, overwrite=args.overwrite)
        trainer.train()
    except TrainingStopped as e:  # every rank stopped after the same step: say it once
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: {e}", file=sys.stderr)
        shutdown_distributed()
        return 128 + e.signum
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:  # Ctrl-C before the loop started (loading, building the demo model)
        print(f"{prog}: interrupted before training started; nothing to save", file=sys.stderr)
        return 130
    shutdown_distributed()
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npo plot", description="Write PNG curves of a run into RUN_DIR/plots/.")
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    from npo_engine.metrics import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


COMMANDS = {"train": train_main, "plot": plot_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="npo", description="npo_engine: RL post-training with Near-Future Policy Optimization.",
        epilog="commands:\n  train   train a policy (npo train --help lists every config key)\n"
        "  plot    write PNG curves of a run directory\n\n"
        "config keys of npo train (set in --config YAML as section: {key: value}, or as section.key=value):\n\n"
        + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
