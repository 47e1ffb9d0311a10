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
    if "steps" in summary:  # rank 0
        print(describe(summary, config.run.output_dir))
    if summary.get("exit_code"):  # SIGINT / SIGTERM: 130 / 143 after the checkpoint
        raise SystemExit(summary["exit_code"])


def cmd_pretrain(args: argparse.Namespace) -> None:
    config = _config(args)
    from ddrl_scale.parallel.distributed import shutdown
    from ddrl_scale.train.pretrain import pretrain

    setup(config.run.num_threads)
    from ddrl_scale.train.host_checks import check_host

    check_host(config)
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

    path = export_checkpoint(args.checkpoint, args.out, ema=args.ema, dtype=args.dtype,
                             format=args.format)
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


def cmd_launch_slurm(args: argparse.Namespace) -> None:
    flags = {"nodes": args.nodes, "nproc_per_node": args.nproc_per_node, "time": args.time,
             "partition": args.partition, "gpus_per_node": args.gpus_per_node}
    overrides = [*args.overrides, *(f"launch.{key}={value}" for key, value in flags.items()
                                    if value not in (None, ""))]
    config = load_config(args.config, overrides)
    from ddrl_scale.launch.slurm import launch

    try:
        launch(config, args.sweep, args.chain, args.dry_run)
    except RuntimeError as error:  # sbatch's refusal, said plainly
        print(f"ddrl: error: {error}", file=sys.stderr)
        raise SystemExit(3) from None


def cmd_launch_local(args: argparse.Namespace) -> None:
    load_config(args.config, args.overrides)  # fail here, once, not in every rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "ddrl_scale.cli", "train", args.config,
               *args.overrides]
    print(" ".join(command), flush=True)
    # Ctrl-C reaches torchrun and every rank; the ranks finish their step and checkpoint
    # (train/preemption.py) while torchrun waits this long before SIGKILL (its default: 30 s)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    os.execv(sys.executable, command)


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
    from ddrl_scale.data.commands import add_data_commands

    add_data_commands(data_commands)  # prepare, validate, stats

    experiment = commands.add_parser("experiment", help="experiments that validate the algorithm")
    experiments = experiment.add_subparsers(dest="experiment", required=True)
    hacking = experiments.add_parser("hacking", help="DDRL vs Flow-GRPO-style vs reward-only")
    hacking.add_argument("--quick", action="store_true", help="1 seed, 2 steps (the test mode)")
    hacking.add_argument("--seeds", type=int, default=0, help="seeds per method (default 3)")
    hacking.add_argument("--steps", type=int, default=0, help="steps per run (default 40)")
    hacking.add_argument("--out", default="", help="report folder")
    hacking.add_argument("overrides", nargs="*", help=overrides_help)
    hacking.set_defaults(handler=cmd_experiment_hacking)

    launch = commands.add_parser("launch", help="run on several processes: this host or SLURM")
    launchers = launch.add_subparsers(dest="launcher", required=True)
    slurm = launchers.add_parser("slurm", help="render and submit the sbatch script of a run")
    slurm.add_argument("config", help="YAML config file")
    slurm.add_argument("overrides", nargs="*", help=overrides_help)
    slurm.add_argument("--nodes", type=int, help="launch.nodes")
    slurm.add_argument("--nproc-per-node", type=int, help="launch.nproc_per_node")
    slurm.add_argument("--gpus-per-node", type=int, help="launch.gpus_per_node")
    slurm.add_argument("--time", help="launch.time, for example 04:00:00")
    slurm.add_argument("--partition", help="launch.partition")
    slurm.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    slurm.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                       help="a job array over these values (repeat for a grid)")
    slurm.add_argument("--chain", type=int, default=1, metavar="K",
                       help="K jobs in a row, each after the previous ends (long runs)")
    slurm.set_defaults(handler=cmd_launch_slurm)
    local = launchers.add_parser("local", help="torchrun on this host")
    local.add_argument("config", help="YAML config file")
    local.add_argument("overrides", nargs="*", help=overrides_help)
    local.add_argument("--nproc", type=int, required=True, help="processes (ranks)")
    local.set_defaults(handler=cmd_launch_local)

    ckpt = commands.add_parser("ckpt", help="checkpoint tools")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    export = ckpt_commands.add_parser("export", help="consolidate a checkpoint: one safetensors file "
                                                     "or a diffusers folder")
    export.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    export.add_argument("--out", required=True,
                        help="output .safetensors file, or folder for --format diffusers")
    export.add_argument("--format", default="safetensors", choices=["safetensors", "diffusers"],
                        help="safetensors: one file; diffusers: OUT/transformer/ loadable by diffusers "
                             "(model.kind=diffusers_wan)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    export.set_defaults(handler=cmd_ckpt_export)
    from ddrl_scale.rewards.service import add_parser as add_reward_serve_parser

    add_reward_serve_parser(commands)
    from ddrl_scale.telemetry.plan_cli import add_parser as add_plan_parser

    add_plan_parser(commands)
    from ddrl_scale.bench import add_parser as add_bench_parser

    add_bench_parser(commands)
    from ddrl_scale.telemetry.env_report import add_parser as add_env_parser

    add_env_parser(commands)
    return parser


# a user's setting that this host or these files cannot serve: (module, exception class); looked up
# only in modules already imported (one not imported cannot have raised), so that a config error
# exits without importing torch
USER_ERRORS = (("ddrl_scale.storage.safe_load", "CheckpointRefusedError"),
               ("ddrl_scale.train.host_checks", "HostCapabilityError"),
               ("ddrl_scale.kernels.dispatch", "BackendUnavailableError"))


def is_user_error(error: Exception) -> bool:
    types = [ConfigError, FileNotFoundError]
    types += [getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules]
    return isinstance(error, tuple(types))


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that `args` came from: `ddrl data prepare`'s for its args."""
    while True:
        commands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        name = getattr(args, commands[0].dest, None) if commands else None
        if name is None or name not in commands[0].choices:
            return parser
        parser = commands[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before and after options (`ddrl launch slurm C --nodes 2 k=v`):
    # argparse leaves the later ones unrecognised; key=value ones are overrides, others an error
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        # the usage of the command that was given (`ddrl train`'s), not the top level's
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C where no run is in progress (`ddrl train` handles its own)
        print("ddrl: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_user_error(error):
            raise
        # a user's bad input: say what and where, without a traceback; a config error is met by
        # every rank of a torchrun job alike, so rank 0 alone says it
        if not isinstance(error, ConfigError) or os.environ.get("RANK", "0") == "0":
            print(f"ddrl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
