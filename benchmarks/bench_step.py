"""DDRL train-step throughput per engine: samples/s and MFU against the measured matmul peak.

    python benchmarks/bench_step.py [--engines none,fsdp2,...] [--model demo|small|tiny]
                                    [--steps 6] [--warmup 2] [--dtype fp32|bf16] [--quick]

Each engine runs in its own torchrun job on this machine (the cores split evenly between its ranks),
the same global batch for all; a step is a whole DDRL iteration (rollout, rewards, policy and data
terms, optimizer). MFU = model FLOPs of the iteration (ddrl_scale.telemetry.flops) / step time /
the matmul peak measured in the same run. Each engine's step is also split into the trainer's
phases (`time_<phase>` of the metrics: data, rollout, reward, forward, backward, optimizer, publish,
checkpoint, other). --quick: the tiny model, 1 warm-up and 2 timed steps (seconds per engine).
Results: benchmarks/results/<date>-bench_step-<model>-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import TINY_OVERRIDES, machine, write_results  # noqa: E402

ENGINES = {  # name -> (ranks, overrides)
    "none": (1, ["parallel.engine=none"]),
    "fsdp2": (2, ["parallel.engine=fsdp2"]),
    "fsdp2-cp2": (2, ["parallel.engine=fsdp2", "parallel.cp=2"]),
    "deepspeed-zero2": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    "deepspeed-zero3": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"]),
    "megatron-tp2": (2, ["parallel.engine=megatron", "parallel.tp=2"]),
}
MODELS = {  # the demo DiT, and a wider one on larger videos
    "demo": ["model.init_checkpoint=none"],
    "small": ["model.hidden_size=192", "model.depth=6", "model.num_heads=6", "video.height=32",
              "video.width=32", "model.init_checkpoint=none"],
    "tiny": TINY_OVERRIDES,  # --quick: seconds per engine, for tests and smoke runs
}


def worker(args: argparse.Namespace) -> None:
    """Inside torchrun: run warm-up + timed iterations, rank 0 writes the timings."""
    from ddrl_scale.config import load_config
    from ddrl_scale.parallel.distributed import shutdown
    from ddrl_scale.train.trainer import Trainer

    config = load_config(None, args.overrides)
    trainer = Trainer(config)
    times = []
    for index in range(args.warmup + args.steps):
        metrics = trainer.iteration()
        if index >= args.warmup:  # every phase timer, and time_train (forward+backward+optimizer)
            times.append({key: value for key, value in metrics.items() if key.startswith("time_")})
    if trainer.world.is_main:
        Path(args.out).write_text(json.dumps(times))
    shutdown()


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def run_engine(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    from ddrl_scale.config import load_config
    from ddrl_scale.telemetry.flops import ddrl_iteration_flops

    ranks, engine_overrides = ENGINES[name]
    # the model's overrides after the defaults: the tiny model generates fewer demo samples
    overrides = [f"data.generated_dir={workdir / 'shards'}", "data.num_generated=512",
                 *MODELS[args.model], *engine_overrides, f"run.dtype={args.dtype}",
                 "train.eval_prompts=0", "train.progress=false", f"run.output_dir={workdir / name}"]
    out = workdir / f"{name}.json"
    threads = max(1, (os.cpu_count() or 1) // ranks)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", __file__, "--worker", "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"engine {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    times = json.loads(out.read_text())
    step = sum(t["time_step"] for t in times) / len(times)
    config = load_config(None, overrides)
    flops = ddrl_iteration_flops(config)
    samples = config.algo.prompts_per_step * config.algo.group_size
    from ddrl_scale.telemetry.timers import PHASES

    # the exclusive phase timers (they add up to time_step; other time_* metrics are
    # sub-measures); a phase absent from a step counts 0 there
    names = [f"time_{name}" for name in (*PHASES, "other") if any(f"time_{name}" in t for t in times)]
    phases = {key[len("time_"):]: sum(t.get(key, 0.0) for t in times) / len(times) for key in names}
    return {"engine": name, "ranks": ranks, "threads_per_rank": threads, "step_s": step,
            "rollout_s": sum(t["time_rollout"] for t in times) / len(times),
            "train_s": sum(t["time_train"] for t in times) / len(times),
            "data_s": phases.get("data", 0.0), "phases_s": phases,
            "samples_per_s": samples / step, "model_flops_per_step": sum(flops.values()),
            "achieved_flops": sum(flops.values()) / step}


def report(rows: list[dict], peak: float, args: argparse.Namespace, machine: str) -> str:
    lines = [f"# DDRL train step per engine: model `{args.model}`, {args.dtype}",
             "", f"Machine: {machine}. Matmul peak measured in this run, all cores: {peak / 1e9:.1f} GFLOP/s "
             f"({args.dtype}). Command: `python benchmarks/bench_step.py --engines "
             f"{args.engines} --model {args.model} --steps {args.steps} --warmup {args.warmup} "
             f"--dtype {args.dtype}`.", "",
             "| engine | ranks | step (s) | rollout (s) | train (s) | samples/s | GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['ranks']} | {row['step_s']:.3f} | "
                     f"{row['rollout_s']:.3f} | {row['train_s']:.3f} | {row['samples_per_s']:.2f} | "
                     f"{row['achieved_flops'] / 1e9:.1f} | {row['mfu']:.1%} |")
    from ddrl_scale.telemetry.timers import PHASES

    order = [*PHASES, "other"]  # the trainer's order; a phase the timers do not list goes last
    phases = sorted({name for row in rows for name in row["phases_s"]},
                    key=lambda name: (order.index(name) if name in order else len(order), name))
    lines += ["", "Where the step went (seconds per step, exclusive phase timers of rank 0; they add up "
              "to the step):", "", "| engine | " + " | ".join(phases) + " |",
              "|---|" + "---|" * len(phases)]
    for row in rows:
        lines.append(f"| {row['engine']} | "
                     + " | ".join(f"{row['phases_s'].get(name, 0.0):.3f}" for name in phases) + " |")
    lines += ["", "MFU = model FLOPs of the iteration / step time / the matmul peak of the whole "
              "machine (all ranks share it). The step includes rollout sampling, reward scoring, "
              "Python overhead and, for several ranks, gloo collectives."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--model", default="demo", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true",
                        help="the tiny model, 1 warm-up and 2 timed steps (seconds per engine)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.model, args.steps, args.warmup = "tiny", 2, 1
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    from ddrl_scale.telemetry.flops import measure_matmul_peak

    names = args.engines.split(",")
    unknown = [name for name in names if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; known: {sorted(ENGINES)}")
    # the whole machine's peak (the ranks share it), whatever OMP_NUM_THREADS this process was given
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    peak = measure_matmul_peak(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    torch.set_num_threads(threads)
    description = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = run_engine(name, args, Path(tmp))
            row["mfu"] = row["achieved_flops"] / peak
            rows.append(row)
            print(f"{name:>10}: {row['step_s']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, "
                  f"MFU {row['mfu']:.1%}", flush=True)
    payload = {"machine": description, "peak_flops": peak, "peak_threads": os.cpu_count() or 1,
               "dtype": args.dtype, "model": args.model,
               "steps": args.steps, "warmup": args.warmup, "rows": rows}
    write_results(f"bench_step-{args.model}", payload, report(rows, peak, args, description))


if __name__ == "__main__":
    main()
