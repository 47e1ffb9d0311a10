"""Rollout benchmark: sampler throughput, weight-publish time against model size, and the DDRL step
time with colocated against disaggregated rollouts.

    python benchmarks/bench_rollout.py [--parts sampler,publish,e2e] [--steps 6] [--warmup 2] [--quick]

* sampler: videos/s and denoising steps/s of the SDE sampler on the demo DiT, and its overhead over
  the bare forward passes it needs (the same batch, the same number of calls);
* publish: one trainer and one rollout rank (torchrun, gloo on CPU, NCCL on GPUs) publish the
  weights of DiTs of growing size; seconds, bytes and GB/s per publish;
* e2e: the demo config trained for --steps steps (after --warmup) colocated in one process,
  disaggregated with one trainer and one rollout rank at max_policy_lag 0 and 1, and with one
  trainer and a 2-rank tensor-parallel rollout copy at lag 0; mean step time, its phases
  (`time_<phase>` of the metrics) and samples/s.

--quick: the tiny DiT of benchmarks/common.py for the sampler and e2e, the two smallest publish sizes,
1 warm-up and 2 timed steps, 1 repeat (seconds per part).

Results: benchmarks/results/<date>-bench_rollout-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_step import free_port  # noqa: E402
from common import TINY_OVERRIDES, machine, write_results  # noqa: E402

PUBLISH_SIZES = {  # name -> DiT overrides; parameters grow ~4x per row
    "demo": [],
    "w128-d4": ["model.hidden_size=128", "model.depth=4", "model.num_heads=4"],
    "w256-d8": ["model.hidden_size=256", "model.depth=8", "model.num_heads=8"],
    "w512-d8": ["model.hidden_size=512", "model.depth=8", "model.num_heads=8"],
    "w768-d12": ["model.hidden_size=768", "model.depth=12", "model.num_heads=12"],
}
E2E = {  # name -> (ranks, overrides)
    "colocated": (1, []),
    "disaggregated-lag0": (2, ["rollout.mode=disaggregated"]),
    "disaggregated-lag1": (2, ["rollout.mode=disaggregated", "rollout.max_policy_lag=1"]),
    # one trainer and one tensor-parallel rollout copy over 2 ranks (rollout.tp_size=2)
    "disaggregated-tp2-lag0": (3, ["rollout.mode=disaggregated", "rollout.num_ranks=2",
                                   "rollout.tp_size=2"]),
}


def _best(function, repeats: int) -> float:
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bench_sampler(repeats: int = 5, overrides: list[str] | None = None) -> dict:
    from ddrl_scale.algo.samplers import sample
    from ddrl_scale.algo.schedules import sigma_schedule
    from ddrl_scale.config import load_config
    from ddrl_scale.models import build_model, build_text_encoder

    config = load_config(None, overrides or [])
    model = build_model(config).eval()
    samples = config.algo.prompts_per_step * config.algo.group_size
    video = config.video
    noise = torch.randn(samples, video.channels, video.num_frames, video.height, video.width)
    text = build_text_encoder(config).encode(["a red circle moving right"] * samples, torch.device("cpu"))
    sigmas = sigma_schedule(config.sampler.num_steps, config.sampler.shift)
    steps = config.sampler.num_steps

    @torch.no_grad()
    def sampler():
        sample(lambda x, sigma: model(x, sigma, text), noise, sigmas, kind="sde",
               noise_level=config.sampler.noise_level)

    @torch.no_grad()
    def forwards():
        for index in range(steps):
            model(noise, torch.full((samples,), float(sigmas[index])), text)

    sampled, bare = _best(sampler, repeats), _best(forwards, repeats)
    return {"samples": samples, "steps": steps, "repeats": repeats, "sampler_s": sampled, "forwards_s": bare,
            "overhead": sampled / bare - 1.0, "videos_per_s": samples / sampled,
            "denoise_steps_per_s": samples * steps / sampled}


def publish_worker(args: argparse.Namespace) -> None:
    """Inside torchrun (rank 0 trainer, rank 1 rollout): time publishes for every size."""
    from ddrl_scale.config import load_config
    from ddrl_scale.models import VideoDiT, build_model, dit_config_from
    from ddrl_scale.parallel import build_engine
    from ddrl_scale.parallel.distributed import shutdown
    from ddrl_scale.parallel.roles import init_roles
    from ddrl_scale.rollout.publish import publish_weights, receive_weights

    base = ["rollout.mode=disaggregated", "model.init_checkpoint=none"]
    roles, world = init_roles(load_config(None, base))
    rows = []
    sizes = list(PUBLISH_SIZES)[:2] if args.quick else list(PUBLISH_SIZES)
    for name in sizes:
        overrides = PUBLISH_SIZES[name]
        config = load_config(None, [*base, *overrides])
        if roles.role == "trainer":
            model = build_model(config)
            engine = build_engine(model, config.optim, config.parallel, world)
            parameters = sum(p.numel() for p in model.parameters())
        else:
            model = VideoDiT(dit_config_from(config)).to(world.device)
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            if roles.role == "trainer":
                result = publish_weights(engine, roles, 0, int(config.rollout.publish_bucket_mb * 2**20),
                                         torch.float32, world.device, verify=False)
            else:
                receive_weights(model, roles.publish, world.device)
            times.append(time.perf_counter() - start)
        if roles.role == "trainer":
            best = min(times[1:])
            rows.append({"model": name, "parameters": parameters, "bytes": result["bytes"],
                         "buckets": result["buckets"], "publish_s": best,
                         "gb_per_s": result["bytes"] / best / 1e9})
    if roles.role == "trainer":
        Path(args.out).write_text(json.dumps(rows))
    shutdown()


def _torchrun(ranks: int, arguments: list[str], threads: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def bench_publish(args: argparse.Namespace, workdir: Path) -> list[dict]:
    out = workdir / "publish.json"
    _torchrun(2, [__file__, "--publish-worker", "--out", str(out), "--repeats", str(args.repeats),
                  *(["--quick"] if args.quick else [])], max(1, (os.cpu_count() or 2) // 2))
    return json.loads(out.read_text())


def bench_e2e(args: argparse.Namespace, workdir: Path) -> list[dict]:
    rows, cores = [], os.cpu_count() or 2
    for name, (ranks, overrides) in E2E.items():
        run_dir = workdir / name
        command = ["-m", "ddrl_scale.cli", "train", "configs/demo_cpu.yaml", *overrides,
                   f"train.steps={args.warmup + args.steps}", "train.eval_prompts=0",
                   "train.save_every=0", "train.progress=false", f"run.output_dir={run_dir}",
                   f"data.generated_dir={workdir / 'shards'}", *(TINY_OVERRIDES if args.quick else [])]
        _torchrun(ranks, command, max(1, cores // ranks))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["step"] > args.warmup]
        # every phase timer (exclusive: they add up to time_step) and the throughput figures
        keys = {key for r in timed for key in r if key.startswith("time_")}
        keys |= {"time_step", "time_rollout", "time_train", "time_publish", "trainer_idle_fraction",
                 "rollout_idle_fraction", "policy_lag", "samples_per_s"}
        mean = {key: sum(r.get(key, 0.0) for r in timed) / len(timed) for key in sorted(keys)}
        rows.append({"setup": name, "ranks": ranks, "threads_per_rank": max(1, cores // ranks),
                     **mean})
    return rows


def report(result: dict) -> str:
    lines = ["# Rollout benchmark", "", f"Machine: {result['machine']}. Command: "
             f"`{result['command']}`.", ""]
    if "sampler" in result:
        s = result["sampler"]
        lines += ["## Sampler (demo DiT, one process)", "",
                  f"{s['samples']} videos x {s['steps']} SDE steps: {s['sampler_s'] * 1e3:.1f} ms, "
                  f"the same {s['steps']} bare forward passes {s['forwards_s'] * 1e3:.1f} ms: "
                  f"sampler overhead {s['overhead']:.1%} (target <= 5%); {s['videos_per_s']:.1f} "
                  f"videos/s, {s['denoise_steps_per_s']:.0f} denoising steps/s "
                  f"(best of {s.get('repeats', 5)}).", ""]
    if "publish" in result:
        lines += ["## Weight publish, 1 trainer -> 1 rollout rank", "",
                  "| model | parameters | MB | buckets | publish (ms) | GB/s |", "|---|---|---|---|---|---|"]
        for r in result["publish"]:
            lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['bytes'] / 1e6:.1f} | "
                         f"{r['buckets']} | {r['publish_s'] * 1e3:.1f} | {r['gb_per_s']:.2f} |")
        lines.append("")
    if "e2e" in result:
        lines += ["## DDRL step, demo config", "",
                  "| setup | ranks | threads/rank | step (s) | waiting for rollouts (s) | train (s) | "
                  "publish (s) | samples/s | trainer idle | rollout idle | mean lag |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["e2e"]:
            lines.append(f"| {r['setup']} | {r['ranks']} | {r['threads_per_rank']} | "
                         f"{r['time_step']:.3f} | {r['time_rollout']:.3f} | {r['time_train']:.3f} | "
                         f"{r['time_publish']:.3f} | {r.get('samples_per_s', float('nan')):.2f} | "
                         f"{r['trainer_idle_fraction']:.1%} | "
                         f"{r['rollout_idle_fraction']:.1%} | {r['policy_lag']:.2f} |")
        lines += ["", "Colocated: one process with all cores samples and trains in turn. "
                  "Disaggregated: the cores are split between a trainer and a rollout rank; at lag 0 "
                  "they take turns, at lag 1 sampling of the next step overlaps training; tp2: the "
                  "rollout copy is split over 2 ranks (rollout.tp_size=2). "
                  "`time_rollout` of the colocated run is the sampling itself; of a disaggregated "
                  "run, the trainer's wait for trajectories.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--parts", default="sampler,publish,e2e")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="tiny DiT, two publish sizes, 1 warm-up + 2 steps, 1 repeat")
    parser.add_argument("--publish-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish_worker:
        return publish_worker(args)
    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 1
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be >= 1 and --warmup >= 0, got {args.steps}, "
                     f"{args.repeats} and {args.warmup}")
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"sampler", "publish", "e2e"})
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: sampler, publish, e2e")
    result = {"machine": machine(), "command": "python benchmarks/bench_rollout.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        if "sampler" in parts:
            result["sampler"] = bench_sampler(args.repeats if args.quick else 5,
                                              TINY_OVERRIDES if args.quick else None)
            print(f"sampler: overhead {result['sampler']['overhead']:.1%}", flush=True)
        if "publish" in parts:
            result["publish"] = bench_publish(args, Path(tmp))
            print("publish:", [(r["model"], round(r["publish_s"], 4)) for r in result["publish"]],
                  flush=True)
        if "e2e" in parts:
            result["e2e"] = bench_e2e(args, Path(tmp))
    write_results("bench_rollout", result, report(result))


if __name__ == "__main__":
    main()
