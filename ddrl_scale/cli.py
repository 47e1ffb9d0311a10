"""`ddrl` command line: the only module that reads argv; everything else takes a RunConfig."""

from __future__ import annotations

import argparse
import os
import sys

from ddrl_scale.config import ConfigError, RunConfig, load_config
from ddrl_scale.runtime import setup


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(getattr(args, "config", None), args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    config = _config(args)  # validated before the heavier imports and any work
    from ddrl_scale.parallel.distributed import shutdown
    from ddrl_scale.train.run import describe, run_training

    setup(config.run.num_threads)
    try:
        summary = run_training(config)
    finally:
        shutdown()
    if summary:  # rank 0
        print(describe(summary, config.run.output_dir))


def cmd_pretrain(args: argparse.Namespace) -> None:
    config = _config(args)
    from ddrl_scale.parallel.distributed import shutdown
    from ddrl_scale.train.pretrain import pretrain

    setup(config.run.num_threads)
    try:
        path = pretrain(config)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"base checkpoint: {path}")


def cmd_data_demo(args: argparse.Namespace) -> None:
    config = _config(args)
    from ddrl_scale.train.anchor_data import demo_shards

    setup(config.run.num_threads)
    shards = demo_shards(config)
    print(f"{config.data.num_generated} samples in {len(shards)} shards under "
          f"{config.data.generated_dir}")


def cmd_ckpt_export(args: argparse.Namespace) -> None:
    from ddrl_scale.train.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, ema=args.ema, dtype=args.dtype)
    print(f"exported {'EMA ' if args.ema else ''}weights to {path}")


def cmd_experiment_hacking(args: argparse.Namespace) -> None:
    import datetime
    from pathlib import Path

    load_config(None, args.overrides)  # bad overrides fail before any work
    from ddrl_scale.experiments.hacking import Setting, run_experiment
    from ddrl_scale.experiments.hacking_report import write_report

    setup(0)
    setting = Setting.quick() if args.quick else Setting()
    if args.seeds:
        setting.seeds = args.seeds
    if args.steps:
        setting.steps = args.steps
    stamp = datetime.date.today().isoformat()
    out = Path(args.out or f"benchmarks/results/{stamp}-hacking{'-quick' if args.quick else ''}")
    command = " ".join(["ddrl experiment hacking", *(["--quick"] if args.quick else []),
                        *([f"--seeds {args.seeds}"] if args.seeds else []),
                        *([f"--steps {args.steps}"] if args.steps else []), *args.overrides])
    report = write_report(run_experiment(setting, args.overrides, out), out, command)
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddrl", description="DDRL post-training of video DiTs")
    commands = parser.add_subparsers(dest="command", required=True)
    overrides_help = "config overrides, key=value (for example optim.lr=1e-5)"

    train = commands.add_parser("train", help="post-train with DDRL from a YAML config")
    train.add_argument("config", help="YAML config file, for example configs/demo_cpu.yaml")
    train.add_argument("overrides", nargs="*", help=overrides_help)
    train.set_defaults(handler=cmd_train)

    def with_overrides(parser: argparse.ArgumentParser, handler, config_option: bool = True) -> None:
        parser.add_argument("overrides", nargs="*", help=overrides_help)
        if config_option:
            parser.add_argument("--config", default=None, help="optional YAML config file")
        parser.set_defaults(handler=handler, **({} if config_option else {"config": None}))

    with_overrides(commands.add_parser("demo", help="the CPU demo: DDRL on the embedded defaults"),
                   cmd_train, config_option=False)
    with_overrides(commands.add_parser("pretrain", help="flow-matching pretraining of the base model"),
                   cmd_pretrain)
    data = commands.add_parser("data", help="anchor data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    with_overrides(data_commands.add_parser("demo", help="write the procedural demo shards"),
                   cmd_data_demo)

    experiment = commands.add_parser("experiment", help="experiments that validate the algorithm")
    experiments = experiment.add_subparsers(dest="experiment", required=True)
    hacking = experiments.add_parser("hacking", help="DDRL vs Flow-GRPO-style vs reward-only")
    hacking.add_argument("--quick", action="store_true", help="1 seed, 2 steps (the test mode)")
    hacking.add_argument("--seeds", type=int, default=0, help="seeds per method (default 3)")
    hacking.add_argument("--steps", type=int, default=0, help="steps per run (default 40)")
    hacking.add_argument("--out", default="", help="report folder")
    hacking.add_argument("overrides", nargs="*", help=overrides_help)
    hacking.set_defaults(handler=cmd_experiment_hacking)

    ckpt = commands.add_parser("ckpt", help="checkpoint tools")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    export = ckpt_commands.add_parser("export", help="consolidate a checkpoint into one safetensors file")
    export.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    export.set_defaults(handler=cmd_ckpt_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ConfigError, FileNotFoundError) as error:
        # a user's bad input: say what and where, without a traceback
        print(f"ddrl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
