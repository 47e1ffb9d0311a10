"""Anchor loader throughput against a raw sequential read of the same shards, and trainer wait time.

    python benchmarks/bench_loader.py [--samples 384] [--per-shard 32] [--shape 16,8,64,64]
                                      [--batch 8] [--workers 0,1,2] [--repeats 3] [--step-ms 200]
                                      [--quick]

Writes latent shards (fp16 safetensors members, with sidecars and index.json, as `ddrl data prepare`
does) into a temporary folder, reads them once to warm the page cache, then measures, best of
`--repeats`:
  * raw file read: every shard file read sequentially in 8 MiB chunks (the disk/page-cache bound);
  * raw tar read: every member of every shard read with Python's tarfile, in order (the bound for
    any tar reader in Python, no decoding);
  * the ShardedAnchorLoader (world size 1) for each worker count, float32 and stored-fp16 batches:
    one epoch of batches after the first (whose start-up time is reported apart), samples/s and MB/s
    of shard bytes;
  * trainer waiting: the loader (largest worker count) feeding a simulated trainer step of
    `--step-ms` (a sleep: the accelerator computing while the CPU waits), the fraction of wall time
    spent in `next_batch`; and the real demo Trainer (default config, demo pixel shards) with the
    sharded loader swapped in, `time_data / time_step` over a few iterations.
--quick: 32 small samples, workers 0,1, 1 repeat, 5 simulated steps of 20 ms, and the tiny DiT of
benchmarks/common.py for 1 trainer iteration (seconds). Results:
benchmarks/results/<date>-bench_loader-<machine>-<cpus>cpu.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import TINY_OVERRIDES, write_results  # noqa: E402  (benchmarks/common.py, beside this file)

from ddrl_scale.data import latent_shards as fmt
from ddrl_scale.data.sharded import ShardedAnchorLoader

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def write_latent_shards(folder: Path, num_samples: int, per_shard: int, shape: tuple[int, ...]) -> list[str]:
    """Random fp16 latents in shards + sidecars + index.json (the layout prepare writes)."""
    (folder / fmt.SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    sidecars = []
    for first in range(0, num_samples, per_shard):
        name, samples = f"part-{first // per_shard:06d}.tar", []
        with tarfile.open(folder / name, "w") as tar:
            for index in range(first, min(num_samples, first + per_shard)):
                latents = torch.randn(shape, generator=generator).half()
                members = fmt.encode_latents(latents, None, "safetensors")
                key = f"sample{index:08d}"
                fmt.add_sample(tar, key, {**members, "txt": f"caption {index}".encode(), "json": b"{}"})
                data = members["latents.safetensors"]
                samples.append({"key": key, "shape": list(shape), "dtype": "fp16",
                                "member": "latents.safetensors", "sha256": fmt.sha256_bytes(data),
                                "bytes": len(data), "source": key})
        sidecar = {"name": name, "num_samples": len(samples), "bytes": (folder / name).stat().st_size,
                   "sha256": fmt.sha256_file(folder / name), "samples": samples, "skipped": []}
        fmt.write_json_atomic(folder / fmt.SIDECAR_DIR / f"{Path(name).stem}.json", sidecar)
        sidecars.append(sidecar)
    fmt.write_index(folder, sidecars, {"dtype": "fp16"})
    return [str(folder / sidecar["name"]) for sidecar in sidecars]


def raw_file_read(shards: list[str]) -> tuple[float, int]:
    start, total = time.perf_counter(), 0
    for shard in shards:
        with open(shard, "rb") as handle:
            while chunk := handle.read(8 << 20):
                total += len(chunk)
    return time.perf_counter() - start, total


def raw_tar_read(shards: list[str]) -> tuple[float, int]:
    start, total = time.perf_counter(), 0
    for shard in shards:
        with tarfile.open(shard, "r|") as tar:
            for info in tar:
                if info.isfile():
                    total += len(tar.extractfile(info).read())
    return time.perf_counter() - start, total


def loader_epoch(shards: list[str], batch: int, workers: int, num_samples: int,
                 latents_dtype: torch.dtype | None) -> tuple[float, int, int, float]:
    """(seconds, shard bytes, samples) of one epoch's batches after the first, and the first batch's
    seconds (start-up: worker processes, first shard opens) apart."""
    loader = ShardedAnchorLoader(shards, batch, seed=0, num_workers=workers, shuffle_window=64,
                                 latents_dtype=latents_dtype)
    start = time.perf_counter()
    loader.next_batch()
    startup = time.perf_counter() - start
    before = loader.metrics()
    start = time.perf_counter()
    for _ in range(num_samples // batch - 1):
        loader.next_batch()
    seconds = time.perf_counter() - start
    after = loader.metrics()
    loader.close()
    read, samples = after["bytes_read"] - before["bytes_read"], after["samples"] - before["samples"]
    return seconds, int(read), int(samples), startup


def simulated_wait(shards: list[str], batch: int, workers: int, step_s: float, steps: int) -> dict:
    """Fraction of a trainer's wall time spent waiting in next_batch when a step takes `step_s`."""
    loader = ShardedAnchorLoader(shards, batch, seed=0, num_workers=workers, shuffle_window=64)
    loader.next_batch()  # start-up (worker processes, first shard opens) is not a steady-state wait
    waited_before, start = loader.wait_s, time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
        time.sleep(step_s)
    total = time.perf_counter() - start
    waited = loader.wait_s - waited_before
    loader.close()
    return {"workers": workers, "step_s": step_s, "steps": steps, "wait_s": waited, "wall_s": total,
            "wait_fraction": waited / total}


def demo_trainer_wait(workdir: Path, workers: int, iterations: int,
                      overrides: list[str] | None = None) -> dict:
    """The default demo Trainer (then `overrides`) with the sharded loader: time_data / time_step per
    iteration."""
    from ddrl_scale.config import load_config
    from ddrl_scale.train.anchor_data import demo_shards
    from ddrl_scale.train.trainer import Trainer

    config = load_config(None, ["model.init_checkpoint=none", "train.eval_prompts=0", "train.progress=false",
                                f"run.output_dir={workdir / 'run'}",
                                f"data.generated_dir={workdir / 'demo_shards'}", "data.num_generated=512",
                                *(overrides or [])])
    trainer = Trainer(config)
    trainer.loader = ShardedAnchorLoader(demo_shards(config), config.algo.prompts_per_step, config.run.seed,
                                         num_workers=workers, encode=trainer.vae.encode)
    trainer.iteration()  # warm-up: worker start-up and first allocations
    rows = [trainer.iteration() for _ in range(iterations)]
    trainer.loader.close()
    data = sum(row["time_data"] for row in rows) / len(rows)
    step = sum(row["time_step"] for row in rows) / len(rows)
    return {"workers": workers, "iterations": iterations, "time_data_s": data, "time_step_s": step,
            "wait_fraction": data / step}


def report(result: dict) -> str:
    args, raw = result["args"], result["raw"]
    lines = [f"# Anchor loader throughput: {args['samples']} samples of {args['shape']} fp16 latents",
             "", f"Machine: {result['machine']}. Load average at start: {result['load_average']} (a shared "
             "machine: other developers' jobs ran at the same time, so figures vary between runs). Page "
             "cache warm (the shards were read once before timing). Best of "
             f"{args['repeats']} repeats. Command: `python benchmarks/bench_loader.py {result['command']}`.",
             "", "| reader | seconds | samples/s | MB/s | vs raw tar read | first batch (s) |",
             "|---|---|---|---|---|---|"]
    tar_rate = raw["tar"]["mb_per_s"]
    for name, row in [("raw file read (8 MiB chunks)", raw["file"]), ("raw tar read (tarfile, in order)",
                                                                       raw["tar"])]:
        lines.append(f"| {name} | {row['seconds']:.3f} | {row['samples_per_s']:.0f} | "
                     f"{row['mb_per_s']:.0f} | {row['mb_per_s'] / tar_rate:.0%} | |")
    for row in result["loader"]:
        lines.append(f"| ShardedAnchorLoader, {row['workers']} workers, {row['output']} batches | "
                     f"{row['seconds']:.3f} | {row['samples_per_s']:.0f} | {row['mb_per_s']:.0f} | "
                     f"{row['mb_per_s'] / tar_rate:.0%} | {row['startup_s']:.3f} |")
    simulated, demo = result["simulated_step"], result["demo_trainer"]
    lines += ["", "Trainer time spent waiting for data:", "",
              f"- simulated step of {simulated['step_s'] * 1000:.0f} ms (sleep), {simulated['workers']} "
              f"workers, {simulated['steps']} steps: {simulated['wait_fraction']:.2%} of wall time "
              f"({simulated['wait_s'] * 1000:.1f} ms waited in total)",
              f"- demo Trainer ({'tiny DiT' if args.get('quick') else 'default config'}, demo pixel "
              f"shards), {demo['workers']} worker, "
              f"{demo['iterations']} iterations: time_data {demo['time_data_s'] * 1000:.2f} ms of "
              f"time_step {demo['time_step_s'] * 1000:.0f} ms = {demo['wait_fraction']:.3%}",
              "", "MB/s counts shard bytes (tar members) for the raw reads and the loader alike. The "
              "loader also decodes (safetensors, no pickle), checks shape and finiteness, batches, and "
              "converts to fp32 (in a batch-prefetch thread); worker processes hand chunks of samples "
              "over through reused shared-memory buffers."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--shape", default="16,8,64,64", help="latent shape C,T,H,W (fp16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=200.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--demo-iterations", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small settings: seconds (tests, smoke runs)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.per_shard, args.shape, args.workers = 32, 8, "4,4,16,16", "0,1"
        args.repeats, args.step_ms, args.steps, args.demo_iterations = 1, 20.0, 5, 1
    if min(args.samples, args.per_shard, args.batch, args.repeats, args.steps, args.demo_iterations) < 1:
        parser.error("--samples, --per-shard, --batch, --repeats, --steps and --demo-iterations must be >= 1")
    if args.samples < 2 * args.batch:
        parser.error(f"--samples ({args.samples}) must be at least 2 x --batch ({args.batch}): the "
                     f"first batch is start-up, the rest are timed")
    shape = tuple(int(size) for size in args.shape.split(","))
    worker_counts = [int(count) for count in args.workers.split(",")]
    machine = (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, Python {platform.python_version()}")
    load_average = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_latent_shards(Path(tmp) / "shards", args.samples, args.per_shard, shape)
        raw_file_read(shards)  # warm the page cache
        raw = {}
        for name, function in (("file", raw_file_read), ("tar", raw_tar_read)):
            seconds, total = min(function(shards) for _ in range(args.repeats))
            raw[name] = {"seconds": seconds, "bytes": total, "samples_per_s": args.samples / seconds,
                         "mb_per_s": total / seconds / 1e6}
            print(f"raw {name}: {raw[name]['mb_per_s']:.0f} MB/s, {raw[name]['samples_per_s']:.0f} samples/s",
                  flush=True)
        rows = []
        for workers in worker_counts:
            for output, dtype in (("float32", torch.float32), ("stored fp16", None)):
                seconds, total, samples, startup = min(loader_epoch(shards, args.batch, workers, args.samples,
                                                                    dtype) for _ in range(args.repeats))
                rows.append({"workers": workers, "output": output, "seconds": seconds, "bytes": total,
                             "samples": samples, "samples_per_s": samples / seconds,
                             "mb_per_s": total / seconds / 1e6, "startup_s": startup})
                print(f"loader, {workers} workers, {output}: {rows[-1]['mb_per_s']:.0f} MB/s, "
                      f"{rows[-1]['samples_per_s']:.0f} samples/s", flush=True)
        simulated = simulated_wait(shards, args.batch, max(worker_counts), args.step_ms / 1000, args.steps)
        print(f"simulated step: waiting {simulated['wait_fraction']:.2%}", flush=True)
        demo = demo_trainer_wait(Path(tmp), 1, args.demo_iterations, TINY_OVERRIDES if args.quick else None)
        print(f"demo trainer: waiting {demo['wait_fraction']:.3%}", flush=True)
    command = " ".join(f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
                       for name, value in vars(args).items() if value is not False)
    result = {"machine": machine, "load_average": load_average, "command": command,
              "args": {**vars(args), "shape": list(shape)}, "raw": raw, "loader": rows,
              "simulated_step": simulated, "demo_trainer": demo}
    write_results("bench_loader", result, report(result))


if __name__ == "__main__":
    main()
