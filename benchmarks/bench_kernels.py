"""Fused DDRL loss kernels against eager torch: time, bytes, GB/s, share of measured memory bandwidth.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py [--shape 4,16,16,128,128] [--dtypes fp32,bf16]
        [--ops flow_matching,sde_log_prob,sde_log_prob_mean] [--backends torch,compile,...]
        [--reps 7] [--warmup 2]

One harness for every op and backend (ddrl_scale.kernels; `torch` is the eager reference in
ddrl_scale.algo): forward (grad enabled, as in training), backward (after an untimed forward) and
both, each the best of --reps repetitions, the backends interleaved within each repetition so that
load from other processes hits them alike. Bytes that must move, per pass as the ops are built
(autograd runs forward and backward separately): forward reads every input once (and writes the
mean when asked), backward reads every input once and writes the gradient once (and reads the
mean's gradient). "both" also gets the single-pass minimum (inputs once, gradient once), the
accounting of shared docs TARGETS.md. The machine's memory bandwidth is measured in the same run
(best of read / dot / copy / triad on buffers as large as one input, before and after the ops). Results:
benchmarks/results/<date>-bench_kernels-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import results_dir  # noqa: E402  (benchmarks/common.py, beside this file)

from ddrl_scale import kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("flow_matching", "sde_log_prob", "sde_log_prob_mean")
MODES = ("forward", "backward", "both")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def measure_bandwidth(nbytes: int, device: torch.device, reps: int) -> dict[str, float]:
    """Best achieved bytes/s of four streaming probes on fp32 buffers of `nbytes` each.

    A single stream often does not saturate memory from one core; the two-stream read (dot) is the
    closest to the ops' forward, which reads three streams at once.
    """
    numel = nbytes // 4
    a, b, c = (torch.rand(numel, device=device) for _ in range(3))
    probes = {  # name -> (function, bytes it moves)
        "read": (lambda: a.sum(), nbytes),
        "dot": (lambda: torch.dot(a, b), 2 * nbytes),
        "copy": (lambda: c.copy_(a), 2 * nbytes),
        "triad": (lambda: torch.add(a, b, alpha=0.5, out=c), 3 * nbytes),
    }
    result = {}
    for name, (function, moved) in probes.items():
        function()
        result[name] = moved / min(timed(function, device) for _ in range(reps))
    result["best"] = max(result.values())
    return result


@dataclass
class Case:
    """One op on one dtype: its inputs, how to run it, and the bytes each pass must move."""

    op: str
    dtype: str
    forward: Callable[[str], tuple[torch.Tensor, ...]]
    upstream: tuple[torch.Tensor, ...]
    v: torch.Tensor
    bytes: dict[str, int]


def build_case(op: str, dtype_name: str, shape: tuple[int, ...], device: torch.device) -> Case:
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[dtype_name]

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    v, a, b = randn().requires_grad_(), randn(), randn()
    batch, numel = shape[0], v.numel()
    inputs = 3 * numel * v.element_size()
    gradient = numel * v.element_size()
    mean = numel * 4 if op == "sde_log_prob_mean" else 0  # the fp32 mean, and its gradient
    upstream: tuple[torch.Tensor, ...] = (torch.full((batch,), 1.0 / batch, device=device),)
    if op == "flow_matching":
        def forward(backend: str) -> tuple[torch.Tensor, ...]:
            return (kernels.flow_matching_loss(v, a, b, backend=backend),)
    else:
        return_mean = op == "sde_log_prob_mean"
        if return_mean:
            upstream += (torch.randn(shape, generator=generator, device=device) * 1e-3,)

        def forward(backend: str) -> tuple[torch.Tensor, ...]:
            # a middle step of a 0.75 -> 0.6 schedule, noise level 0.7 (the sampler default)
            outputs = kernels.sde_log_prob(v, a, b, 0.75, 0.6, 0.7, backend=backend, return_mean=return_mean)
            return outputs if return_mean else (outputs,)
    sizes = {"forward": inputs + mean, "backward": inputs + gradient + mean,
             "both_minimum": inputs + gradient + 2 * mean}
    sizes["both"] = sizes["forward"] + sizes["backward"]
    return Case(op, dtype_name, forward, upstream, v, sizes)


def run_mode(case: Case, backend: str, mode: str, device: torch.device) -> float:
    """Seconds for one run of `mode`; the gradient goes to torch.autograd.grad (nothing accumulates)."""
    if mode == "forward":
        return timed(lambda: case.forward(backend), device)
    if mode == "backward":
        outputs = case.forward(backend)
        return timed(lambda: torch.autograd.grad(outputs, case.v, case.upstream), device)
    return timed(lambda: torch.autograd.grad(case.forward(backend), case.v, case.upstream), device)


def bench_case(case: Case, backends: list[str], args: argparse.Namespace, device: torch.device,
               bandwidth: float) -> list[dict]:
    times = {(backend, mode): [] for backend in backends for mode in MODES}
    for backend in backends:  # warm-up: compilation, autotuning, first-touch of allocator pools
        for mode in MODES:
            for _ in range(args.warmup):
                run_mode(case, backend, mode, device)
    for _ in range(args.reps):
        for mode in MODES:
            for backend in backends:
                times[(backend, mode)].append(run_mode(case, backend, mode, device))
    rows = []
    for (backend, mode), samples in times.items():
        best = min(samples)
        moved = case.bytes[mode]
        row = {"op": case.op, "dtype": case.dtype, "backend": backend, "mode": mode, "best_s": best,
               "median_s": sorted(samples)[len(samples) // 2], "bytes": moved, "gbps": moved / best / 1e9,
               "bandwidth_fraction": moved / best / bandwidth,
               "speedup_vs_eager": min(times[("torch", mode)]) / best}
        if mode == "both":
            row["bytes_minimum"] = case.bytes["both_minimum"]
            row["bandwidth_fraction_minimum"] = case.bytes["both_minimum"] / best / bandwidth
        rows.append(row)
    return rows


def device_label(device: torch.device) -> tuple[str, str]:
    """(a description for the report, a short name for the file)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, torch {torch.__version__}", re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    cores = os.cpu_count()
    host = " ".join(part for part in (platform.node(), platform.machine(), platform.processor()) if part)
    description = (f"{host}, {cores} CPU cores, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}")
    return description, f"{platform.machine()}-{cores}cpu-{torch.get_num_threads()}thread"


def load_average() -> str:
    """The 1-minute load average: other processes share the machine, and this says how much."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def report(rows: list[dict], bandwidth: dict[str, float], args: argparse.Namespace, machine: str) -> str:
    lines = [f"# Fused DDRL loss kernels vs eager torch, shape {args.shape}", "",
             f"Load average (1 min) at start {args.load_start}, at end {args.load_end}.", "",
             f"Machine: {machine}. Memory bandwidth measured in this run (best of {args.reps} before and "
             f"{args.reps} after the ops, buffers as large as one input): read "
             f"{bandwidth['read'] / 1e9:.1f} GB/s, two-stream read {bandwidth['dot'] / 1e9:.1f} GB/s, copy "
             f"{bandwidth['copy'] / 1e9:.1f} GB/s, triad "
             f"{bandwidth['triad'] / 1e9:.1f} GB/s; the fractions below are of the best, "
             f"{bandwidth['best'] / 1e9:.1f} GB/s.", "",
             f"Command: `python benchmarks/bench_kernels.py --shape {args.shape} --dtypes {args.dtypes} "
             f"--ops {args.ops} --backends {args.backends} --reps {args.reps} --warmup {args.warmup}`.", "",
             "| op | dtype | mode | backend | best (ms) | median (ms) | speed-up vs eager | MB moved | GB/s "
             "| % of bandwidth | % of bandwidth, single-pass minimum |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        minimum = f"{row['bandwidth_fraction_minimum']:.0%}" if "bandwidth_fraction_minimum" in row else ""
        lines.append(f"| {row['op']} | {row['dtype']} | {row['mode']} | {row['backend']} | "
                     f"{row['best_s'] * 1e3:.2f} | {row['median_s'] * 1e3:.2f} | "
                     f"{row['speedup_vs_eager']:.1f}x | {row['bytes'] / 1e6:.0f} | {row['gbps']:.1f} | "
                     f"{row['bandwidth_fraction']:.0%} | {minimum} |")
    lines += ["", "Bytes per pass: forward reads each input once (+ writes the fp32 mean for "
              "sde_log_prob_mean); backward reads each input once and writes the gradient once (+ reads "
              "the mean's gradient); both = forward + backward. The single-pass minimum counts inputs and "
              "gradient once (a lower bound no autograd-separated forward/backward reaches). Eager rows "
              "move far more than these bytes; their GB/s is only time relative to the same bytes."]
    return "\n".join(lines) + "\n"


def available_backends(device: torch.device) -> list[str]:
    names = ["torch"]
    for name in ("compile", "triton", "cuda"):
        try:
            kernels.resolve_backend(name, device)
        except kernels.BackendUnavailableError as error:
            print(f"skipping backend {name}: {error}")
            continue
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shape", default="4,16,16,128,128", help="(B, C, T, H, W) of every input")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--backends", default="", help="default: torch and every backend available here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(size) for size in args.shape.split(","))
    for name, values, known in (("--dtypes", args.dtypes, DTYPES), ("--ops", args.ops, OPS)):
        unknown = [value for value in values.split(",") if value not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; known: {list(known)}")
    backends = args.backends.split(",") if args.backends else available_backends(device)
    if "torch" not in backends:
        backends.insert(0, "torch")  # the eager baseline of every speed-up
    args.backends = ",".join(backends)
    machine, label = device_label(device)
    args.load_start = load_average()
    input_bytes = torch.Size(shape).numel() * 4
    bandwidth = measure_bandwidth(input_bytes, device, args.reps)
    measured = ", ".join(f"{name} {value / 1e9:.1f} GB/s" for name, value in bandwidth.items())
    print(f"{machine}\nmemory bandwidth: {measured}", flush=True)
    rows = []
    for op in args.ops.split(","):
        for dtype in args.dtypes.split(","):
            case = build_case(op, dtype, shape, device)
            for row in bench_case(case, backends, args, device, bandwidth["best"]):
                rows.append(row)
                print(f"{op:>18} {dtype} {row['mode']:>8} {row['backend']:>8}: {row['best_s'] * 1e3:8.2f} ms "
                      f"{row['gbps']:6.1f} GB/s, {row['speedup_vs_eager']:5.1f}x eager", flush=True)
            del case
    # measured again at the end: the best of both runs, so a busy moment at the start cannot inflate
    # the fractions
    again = measure_bandwidth(input_bytes, device, args.reps)
    bandwidth = {name: max(value, again[name]) for name, value in bandwidth.items()}
    args.load_end = load_average()
    for row in rows:
        for key, moved in (("bandwidth_fraction", "bytes"), ("bandwidth_fraction_minimum", "bytes_minimum")):
            if moved in row:
                row[key] = row[moved] / row["best_s"] / bandwidth["best"]
    text = report(rows, bandwidth, args, machine)
    print(text)
    if args.no_write:
        return
    folder = results_dir()  # $DDRL_BENCH_RESULTS under `ddrl bench`
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-bench_kernels-{label}"
    payload = {"machine": machine, "device": str(device), "shape": shape, "threads": torch.get_num_threads(),
               "load_average_1min": [args.load_start, args.load_end], "bandwidth_bytes_per_s": bandwidth,
               "rows": rows}
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(text)
    print(f"written: {folder / stem}.json / .md")


if __name__ == "__main__":
    main()
