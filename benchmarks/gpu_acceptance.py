"""The logic behind benchmarks/gpu_acceptance.sh: prerequisites, the plan, the GPU checks, the report.

Where it sits: gpu_acceptance.sh asks `prereqs` and `plan` (standard library only: they run before
anything is installed), runs each planned step (an install, pytest, a torchrun job, or one of the
subcommands below under the installed Python), and ends with `report`, which reads what the steps left
in the output folder and writes benchmarks/results/<date>-gpu-<gpu>.md.

    python benchmarks/gpu_acceptance.py prereqs [--no-install]
    python benchmarks/gpu_acceptance.py plan --gpus N --python PY --out DIR [--install VENV] [--with-flash]
    python benchmarks/gpu_acceptance.py info|attention|telemetry|peak --out DIR
    python benchmarks/gpu_acceptance.py step --engine NAME --out DIR   (torchrun of step-worker)
    python benchmarks/gpu_acceptance.py report --out DIR [--results FOLDER]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_static  # noqa: E402  (the README's GPU install commands)

MIN_PYTHON = (3, 10)
INSTALL_DISK_GB = 25.0  # the CUDA torch with its CUDA libraries, the extras and pip's cache
RUN_DISK_GB = 5.0
STEPS, WARMUP = 3, 1
# a DiT large enough that a GPU step is more than launch overhead, small enough for seconds per engine
MODEL = ["model.init_checkpoint=none", "model.hidden_size=384", "model.depth=6", "model.num_heads=6",
         "video.num_frames=8", "video.height=32", "video.width=32", "data.num_generated=256",
         "train.eval_prompts=0", "train.progress=false", "run.device=cuda", "run.dtype=bf16"]
DEMO = ["run.device=cuda", "run.dtype=bf16", "train.steps=10", "train.eval_prompts=8", "train.progress=false"]


# -- prerequisites (standard library only) ----------------------------------------------------------------

def gpu_names() -> list[str] | None:
    """The GPUs nvidia-smi lists, or None without nvidia-smi ($DDRL_NVIDIA_SMI names another program:
    the tests' stand-in)."""
    nvidia_smi = shutil.which(os.environ.get("DDRL_NVIDIA_SMI", "nvidia-smi"))
    if nvidia_smi is None:
        return None
    done = subprocess.run([nvidia_smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def prerequisite_problems(install: bool, free_gb: float | None = None,
                          names: list[str] | None | bool = False) -> list[str]:
    """What this machine lacks for a real run, each as a sentence saying what to do (empty: all there)."""
    problems = []
    if sys.version_info < MIN_PYTHON:
        problems.append(f"python {sys.version.split()[0]} is too old: the project needs Python "
                        f"{'.'.join(map(str, MIN_PYTHON))} or newer (set PYTHON=/path/to/python3.X)")
    names = gpu_names() if names is False else names
    if names is None:
        problems.append("nvidia-smi is missing: this is not a GPU machine, or the NVIDIA driver is not "
                        "installed (the script needs the driver, R580 or newer for CUDA 13.0)")
    elif not names:
        problems.append("nvidia-smi lists no GPU (check `nvidia-smi`, CUDA_VISIBLE_DEVICES and the driver)")
    elif len(names) > 8:
        problems.append(f"{len(names)} GPUs: the script plans for 1-8; restrict with CUDA_VISIBLE_DEVICES")
    needed = INSTALL_DISK_GB if install else RUN_DISK_GB
    free_gb = shutil.disk_usage(ROOT).free / 1e9 if free_gb is None else free_gb
    if free_gb < needed:
        problems.append(f"{free_gb:.1f} GB free on the disk of {ROOT}, need {needed:.0f} GB"
                        + (" (the CUDA torch and its libraries)" if install else ""))
    if shutil.which("timeout") is None:
        problems.append("coreutils' `timeout` is missing (it bounds each step)")
    return problems


# -- the plan -------------------------------------------------------------------------------------------

def engines(gpus: int) -> dict[str, tuple[int, list[str]]]:
    """The engines that fit on `gpus` GPUs: name -> (ranks, overrides). One GPU runs each engine on one
    rank (FSDP2, ZeRO and Megatron with world size 1); two or more add context and tensor parallelism,
    on the largest power of two of ranks (up to 8)."""
    ranks = 1
    while ranks * 2 <= min(max(gpus, 1), 8):
        ranks *= 2
    batch = [f"algo.prompts_per_step={max(4, ranks)}"]  # divisible by every data-parallel size below
    plan = {"none": (1, ["parallel.engine=none"]),
            "fsdp2": (ranks, ["parallel.engine=fsdp2", *batch]),
            "deepspeed-zero2": (ranks, ["parallel.engine=deepspeed", "parallel.zero_stage=2", *batch]),
            "deepspeed-zero3": (ranks, ["parallel.engine=deepspeed", "parallel.zero_stage=3", *batch])}
    if ranks >= 2:
        plan["fsdp2-cp2"] = (ranks, ["parallel.engine=fsdp2", "parallel.cp=2", *batch])
        plan["megatron-tp2"] = (ranks, ["parallel.engine=megatron", "parallel.tp=2", *batch])
    else:
        plan["megatron-tp1"] = (1, ["parallel.engine=megatron", "parallel.tp=1"])
    return plan


def step_overrides(engine: str, gpus: int, out: Path) -> list[str]:
    ranks, overrides = engines(gpus)[engine]
    return [*MODEL, f"data.generated_dir={out / 'shards'}", f"run.output_dir={out / 'runs' / engine}",
            *overrides]


def install_command(venv: str, with_flash: bool) -> str:
    """A fresh venv and the README's GPU install, word for word but for the venv's pip."""
    pip = shlex.quote(str(Path(venv) / "bin" / "pip"))
    commands = [f"{shlex.quote(sys.executable)} -m venv {shlex.quote(venv)}", f"{pip} install --upgrade pip"]
    for command in gpu_static.gpu_install_commands():
        if gpu_static.builds_without_isolation(command) and not with_flash:
            continue  # a source build of flash-attn can take far longer than the whole run
        commands.append(command.replace("pip install", f"{pip} install", 1))
    return " && ".join(commands)


def plan(gpus: int, python: str, out: Path, install: str | None,
         with_flash: bool) -> list[tuple[str, int, bool, str]]:
    """(name, time limit in s, whether a failure stops the run, shell command) for each step."""
    py, o = shlex.quote(python), shlex.quote(str(out))
    me = shlex.quote(str(Path(__file__).relative_to(ROOT)))
    steps = []
    if install:
        steps.append(("install", 600, True, install_command(install, with_flash)))
    steps += [
        ("info", 180, True, f"{py} {me} info --out {o}"),
        ("kernels", 420, False, f"{py} -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py "
                                f"--junitxml {o}/kernels.xml"),
        ("attention", 120, False, f"{py} {me} attention --out {o}"),
        ("telemetry", 60, False, f"{py} {me} telemetry --out {o}"),
        ("peak", 120, True, f"{py} {me} peak --out {o}"),
    ]
    for engine in engines(gpus):
        steps.append((f"step-{engine}", 300, False,
                      f"{py} {me} step --engine {engine} --gpus {gpus} --out {o}"))
    demo = shlex.join([*DEMO, f"run.output_dir={out / 'demo'}", f"data.generated_dir={out / 'demo-shards'}"])
    steps.append(("demo", 300, False, f"{py} -m ddrl_scale.cli demo {demo}"))
    return steps


# -- GPU checks (under the installed Python, with torch) -----------------------------------------------------

def write(out: Path, name: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))


def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda="
                         f"{torch.version.cuda}): install the CUDA torch (README, GPU install) and check "
                         "the driver with nvidia-smi")
    return torch


def version_of(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(out: Path) -> None:
    torch = require_cuda()
    gpus = [{"index": index, "name": torch.cuda.get_device_name(index),
             "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(index)),
             "memory_gb": round(torch.cuda.get_device_properties(index).total_memory / 1e9, 1)}
            for index in range(torch.cuda.device_count())]
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.split("\n")[0].strip()
    write(out, "info", {"date": datetime.date.today().isoformat(), "host": socket.gethostname(),
                        "python": sys.version.split()[0], "torch": torch.__version__,
                        "cuda": torch.version.cuda, "driver": driver,
                        "nccl": ".".join(map(str, torch.cuda.nccl.version())), "gpus": gpus,
                        **{name: version_of(name) for name in ("triton", "flash-attn", "deepspeed",
                                                                "megatron-core", "nvidia-ml-py")}})


def cmd_attention(out: Path) -> None:
    """flash-attn is chosen under bf16 autocast when installed (it is called), and agrees with SDPA."""
    torch = require_cuda()
    from ddrl_scale.models import attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    # fp32 q/k as they leave the RMSNorm and the rotary, bf16 v: the case autocast runs
    q, k = (torch.randn(2, 4, 1024, 64, device="cuda", generator=generator) for _ in range(2))
    v = torch.randn(2, 4, 1024, 64, device="cuda", generator=generator).bfloat16()
    flash, calls = attention.flash_attn_func, []
    if flash is not None:  # count the calls: what ran, not what a helper says would run
        attention.flash_attn_func = lambda *args, **kwargs: calls.append(1) or flash(*args, **kwargs)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = attention.attention(q, k, v, backend="auto")
            sdpa = attention.attention(q, k, v, backend="sdpa")
    finally:
        attention.flash_attn_func = flash
    chosen = "flash" if calls else "sdpa"
    error = (auto.float() - sdpa.float()).abs().max().item()
    write(out, "attention", {"flash_attn": version_of("flash-attn"), "chosen": chosen,
                             "max_abs_diff_vs_sdpa": error, "output_dtype": str(auto.dtype)})
    if flash is not None and chosen != "flash":
        raise SystemExit("flash-attn is installed but the auto backend ran SDPA under bf16 autocast")
    if error > 2e-2:  # bf16 SDPA is within 3.5e-3 of fp32 SDPA on these inputs (measured on a CPU)
        raise SystemExit(f"auto ({chosen}) and SDPA differ by {error:.3g} in bf16")


def cmd_telemetry(out: Path) -> None:
    require_cuda()
    from ddrl_scale.telemetry.gpu import TelemetrySampler

    sampler = TelemetrySampler(interval_s=1.0)
    try:
        values = sampler.sample()
    finally:
        sampler.stop()
    write(out, "telemetry", {"source": sampler.source, "sample": values})
    if sampler.source != "nvml":
        raise SystemExit(f"telemetry read from {sampler.source}, not NVML (is nvidia-ml-py installed?)")


def cmd_peak(out: Path) -> None:
    """The measured dense matmul peak of GPU 0 (bf16 and fp32), the MFU denominator per GPU."""
    torch = require_cuda()
    from ddrl_scale.telemetry.flops import measure_matmul_peak

    # 8192^3 x 2 = 1.1 TFLOP per matmul: milliseconds on a datacenter GPU, well above timer noise
    peaks = {str(dtype).removeprefix("torch."): measure_matmul_peak(dtype, device="cuda", size=8192,
                                                                   repeats=10)
             for dtype in (torch.bfloat16, torch.float32)}
    write(out, "peak", {"device": torch.cuda.get_device_name(0), "flops": peaks})


def cmd_step_worker(out: Path, steps: int, warmup: int, overrides: list[str]) -> None:
    """Inside torchrun: warm-up and timed DDRL iterations; each rank writes its times and CUDA peaks."""
    import torch

    from ddrl_scale.config import load_config
    from ddrl_scale.parallel.distributed import shutdown
    from ddrl_scale.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    times = []
    for index in range(warmup + steps):
        metrics = trainer.iteration()
        if index >= warmup:
            times.append(metrics["time_step"])
    device, cuda = trainer.device, trainer.device.type == "cuda"
    record = {"rank": trainer.world.rank, "device": str(device), "step_s": times,
              "cuda_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
              "cuda_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if cuda else None,
              "last_metrics": {key: value for key, value in metrics.items()
                               if isinstance(value, int | float)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.world.rank}.json").write_text(json.dumps(record, indent=1))
    shutdown()


def cmd_step(engine: str, gpus: int, out: Path) -> None:
    """One engine's bf16 DDRL steps under torchrun; MFU against the measured bf16 peak of its GPUs."""
    from ddrl_scale.config import load_config
    from ddrl_scale.telemetry.flops import ddrl_iteration_flops

    ranks, _ = engines(gpus)[engine]
    overrides = step_overrides(engine, gpus, out)
    ranks_dir = out / "steps" / engine
    shutil.rmtree(ranks_dir, ignore_errors=True)
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        port = handle.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={port}", __file__, "step-worker", "--out", str(ranks_dir),
               "--steps", str(STEPS), "--warmup", str(WARMUP), "--", *overrides]
    print(shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    records = [json.loads(path.read_text()) for path in sorted(ranks_dir.glob("rank*.json"))]
    if len(records) != ranks:
        raise SystemExit(f"{engine}: {len(records)} of {ranks} ranks wrote their results in {ranks_dir}")
    step_s = sum(records[0]["step_s"]) / len(records[0]["step_s"])
    config = load_config(None, overrides)
    flops = sum(ddrl_iteration_flops(config).values())
    peak = json.loads((out / "peak.json").read_text())["flops"]["bfloat16"]
    write(out, f"step-{engine}", {
        "engine": engine, "ranks": ranks, "step_s": step_s, "wall_s": time.perf_counter() - start,
        "samples_per_s": config.algo.prompts_per_step * config.algo.group_size / step_s,
        "model_flops_per_step": flops, "mfu": flops / step_s / (peak * ranks),
        "cuda_peak_allocated_gb": max(record["cuda_peak_allocated_gb"] for record in records),
        "cuda_peak_reserved_gb": max(record["cuda_peak_reserved_gb"] for record in records),
        "loss": {key: records[0]["last_metrics"].get(key)
                 for key in ("policy_loss", "data_loss", "grad_norm")},
        "overrides": overrides})


# -- the report ---------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def statuses(out: Path) -> list[tuple[str, int, int]]:
    rows = []
    for line in (out / "status.tsv").read_text().splitlines() if (out / "status.tsv").exists() else []:
        name, code, seconds = line.split("\t")
        rows.append((name, int(code), int(seconds)))
    return rows


def kernel_tests(out: Path) -> str:
    try:
        suite = ElementTree.parse(out / "kernels.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return "no result (kernels.xml missing)"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    skipped = sorted({(case.find("skipped").get("message") or "")[:140] for case in suite.iter("testcase")
                      if case.find("skipped") is not None})
    return (f"{counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped" + "".join(f"\n  - skipped: {reason}" for reason in skipped))


def gpu_slug(info: dict) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", info["gpus"][0]["name"].lower()).strip("-")
    return f"{len(info['gpus'])}x-{name}" if len(info["gpus"]) > 1 else name


def render(out: Path) -> str:
    info, peak = read_json(out / "info.json"), read_json(out / "peak.json")
    lines = ["# GPU acceptance run", ""]
    if info:
        gpus = ", ".join(f"{gpu['index']}: {gpu['name']} ({gpu['capability']}, {gpu['memory_gb']} GB)"
                         for gpu in info["gpus"])
        lines += [f"{info['date']}, host {info['host']}: {gpus}; driver {info['driver']}. Python "
                  f"{info['python']}, torch {info['torch']} (CUDA {info['cuda']}, NCCL {info['nccl']}), "
                  f"triton {info['triton']}, flash-attn {info['flash-attn']}, deepspeed {info['deepspeed']}, "
                  f"megatron-core {info['megatron-core']}, nvidia-ml-py {info['nvidia-ml-py']}.", ""]
    lines += ["Command: `bash benchmarks/gpu_acceptance.sh`; logs of each step in "
              f"`{out}/logs/`.", "", "| step | result | seconds |", "|---|---|---|"]
    for name, code, seconds in statuses(out):
        result = "ok" if code == 0 else ("timed out" if code == 124 else f"failed (exit {code})")
        lines.append(f"| {name} | {result} | {seconds} |")
    lines += ["", f"Kernels against their references (tests/test_kernels_gpu.py: fp32, bf16, fp16, bf16 on "
              f"fp32; triton, cuda, compile): {kernel_tests(out)}", ""]
    attention = read_json(out / "attention.json")
    if attention:
        lines += [f"Attention under bf16 autocast: flash-attn {attention['flash_attn']}, chosen "
                  f"`{attention['chosen']}`, max |auto - SDPA| = "
                  f"{attention['max_abs_diff_vs_sdpa']:.3g}.", ""]
    telemetry = read_json(out / "telemetry.json")
    if telemetry:
        sample = ", ".join(f"{key} {value:.4g}" for key, value in sorted(telemetry["sample"].items()))
        lines += [f"Telemetry ({telemetry['source']}): {sample}.", ""]
    if peak:
        flops = peak["flops"]
        lines += [f"Measured dense matmul peak of {peak['device']} (8192^3): bf16 "
                  f"{flops['bfloat16'] / 1e12:.1f} TFLOP/s, fp32 {flops['float32'] / 1e12:.1f} TFLOP/s.", ""]
    rows = [row for row in (read_json(path) for path in sorted(out.glob("step-*.json"))) if row]
    if rows:
        lines += [f"bf16 DDRL step per engine ({STEPS} timed after {WARMUP} warm-up; model "
                  f"`{' '.join(MODEL[:6])}`); MFU = model FLOPs / step time / (bf16 peak x ranks):", "",
                  "| engine | ranks | step (s) | samples/s | MFU | CUDA peak allocated (GB) | "
                  "reserved (GB) |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['engine']} | {row['ranks']} | {row['step_s']:.3f} | "
                         f"{row['samples_per_s']:.1f} | {row['mfu']:.1%} | "
                         f"{row['cuda_peak_allocated_gb']:.2f} | {row['cuda_peak_reserved_gb']:.2f} |")
        lines.append("")
    summary = read_json(out / "demo" / "summary.json")
    if summary:
        before, after = summary.get("before", {}), summary.get("after", {})
        nan = float("nan")
        lines += [f"Demo (`ddrl demo {' '.join(DEMO)}`): {summary['steps']} steps in {summary['seconds']} s, "
                  f"evaluation reward {before.get('reward_mean', nan):.3f} -> "
                  f"{after.get('reward_mean', nan):.3f} over {after.get('num_samples')} samples.", ""]
    return "\n".join(lines)


def cmd_report(out: Path, results: Path) -> Path:
    info = read_json(out / "info.json")
    if info is None:  # no GPU identified: nothing worth a results file
        raise SystemExit(f"no report: the run stopped before its info step identified the GPUs "
                         f"({out / 'info.json'} is missing); see {out / 'logs'}")
    date = info["date"]
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{date}-gpu-{gpu_slug(info)}.md"
    path.write_text(render(out))
    print(path.read_text())
    print(f"written: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prereqs", "gpus", "plan", "info", "attention", "telemetry",
                                            "peak", "step", "step-worker", "report"])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_acceptance")
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--install", default="", help="plan: the venv to create and install into")
    parser.add_argument("--with-flash", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--engine", default="none")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    argv = sys.argv[1:] if argv is None else argv
    # step-worker: config overrides after `--` (argparse would not take them after the command)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "prereqs":
        problems = prerequisite_problems(install=not args.no_install)
        print(f"python {sys.version.split()[0]} ({sys.executable}); GPUs: {gpu_names()}; "
              f"{shutil.disk_usage(ROOT).free / 1e9:.0f} GB free")
        for problem in problems:
            print(f"missing: {problem}")
        return 1 if problems else 0
    if args.command == "gpus":
        print(len(gpu_names() or []))
        return 0
    if args.command == "plan":
        for name, limit, critical, command in plan(args.gpus, args.python, args.out, args.install or None,
                                                   args.with_flash):
            print(f"{name}\t{limit}\t{int(critical)}\t{command}")
        return 0
    if args.command == "step-worker":
        cmd_step_worker(args.out, args.steps, args.warmup, overrides)
        return 0
    if args.command == "step":
        cmd_step(args.engine, args.gpus, args.out)
        return 0
    if args.command == "report":
        cmd_report(args.out, args.results)
        return 0
    checks = {"info": cmd_info, "attention": cmd_attention, "telemetry": cmd_telemetry, "peak": cmd_peak}
    checks[args.command](args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
