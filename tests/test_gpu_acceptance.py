"""benchmarks/gpu_acceptance.sh on a CPU machine: --dry-run prints every step and checks the
prerequisites, the planned runs are valid configs, the step worker runs (on CPU), and the report renders.

A stand-in nvidia-smi ($DDRL_NVIDIA_SMI) plays the GPU machine; nothing here claims a GPU result.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ddrl_scale.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_acceptance  # noqa: E402

STEPS_ONE_GPU = ["install", "info", "kernels", "attention", "telemetry", "peak", "step-none", "step-fsdp2",
                 "step-deepspeed-zero2", "step-deepspeed-zero3", "step-megatron-tp1", "demo", "report"]


def fake_nvidia_smi(folder: Path, names: list[str]) -> Path:
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{name}'\n" for name in names))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def dry_run(tmp_path: Path, nvidia_smi: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DDRL_NVIDIA_SMI": nvidia_smi}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def step_lines(stdout: str) -> list[str]:
    return [line.split(": ", 1)[1].split(" (", 1)[0].split(":", 1)[0] for line in stdout.splitlines()
            if line.startswith("step ")]


def test_dry_run_without_nvidia_smi_says_so_and_prints_every_step(tmp_path):
    done = dry_run(tmp_path, str(tmp_path / "no-such-nvidia-smi"))
    assert done.returncode == 0, done.stderr
    assert "missing: nvidia-smi is missing" in done.stdout
    assert "a real run would stop at this point" in done.stdout
    assert step_lines(done.stdout) == STEPS_ONE_GPU
    assert "pip install -e '.[all]'" in done.stdout  # the README's command, into the venv
    assert "flash-attn is not installed without --with-flash" in done.stdout
    assert done.stdout.rstrip().endswith("dry run: nothing was run")
    assert not (tmp_path / "out").exists() and not (ROOT / ".venv-gpu").exists()


def test_dry_run_with_no_gpu_listed(tmp_path):
    done = dry_run(tmp_path, str(fake_nvidia_smi(tmp_path, [])))
    assert done.returncode == 0, done.stderr
    assert "missing: nvidia-smi lists no GPU" in done.stdout


def test_dry_run_plans_parallel_engines_on_two_gpus(tmp_path):
    done = dry_run(tmp_path, str(fake_nvidia_smi(tmp_path, ["NVIDIA H200", "NVIDIA H200"])), "--with-flash",
                   "--no-install")
    assert done.returncode == 0, done.stderr
    steps = step_lines(done.stdout)
    assert "install" not in steps and {"step-fsdp2-cp2", "step-megatron-tp2"} <= set(steps)
    missing = [line for line in done.stdout.splitlines() if line.startswith("missing")]
    assert not any("nvidia-smi" in line or "GPU" in line for line in missing), missing
    assert "--gpus 2" in done.stdout


def test_prerequisite_messages(monkeypatch):
    assert gpu_acceptance.prerequisite_problems(install=False, free_gb=100.0, names=["NVIDIA H200"]) == []
    problems = gpu_acceptance.prerequisite_problems(install=True, free_gb=3.0, names=[])
    assert any("lists no GPU" in problem for problem in problems)
    assert any("3.0 GB free" in problem and "need 25 GB" in problem for problem in problems)
    assert any("nvidia-smi is missing" in problem
               for problem in gpu_acceptance.prerequisite_problems(install=False, free_gb=100.0, names=None))
    monkeypatch.setattr(sys, "version_info", (3, 9, 18))
    assert any("needs Python 3.10" in problem for problem in gpu_acceptance.prerequisite_problems(
        install=False, free_gb=100.0, names=["NVIDIA H200"]))


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_planned_engine_runs_are_valid_configs(gpus, tmp_path):
    for engine, (ranks, _) in gpu_acceptance.engines(gpus).items():
        config = load_config(None, gpu_acceptance.step_overrides(engine, gpus, tmp_path))
        assert config.run.dtype == "bf16" and config.run.device == "cuda"
        model_parallel = config.parallel.cp * config.parallel.tp
        assert ranks <= gpus or ranks == 1
        assert ranks % model_parallel == 0 and config.algo.prompts_per_step % (ranks // model_parallel) == 0


def test_step_worker_runs_one_iteration_on_cpu(tiny_overrides, tmp_path):
    """The worker the step runs under torchrun, here in one process on the CPU (no CUDA figures)."""
    out = tmp_path / "ranks"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "step-worker",
                           "--out", str(out), "--steps", "1", "--warmup", "0", "--", *tiny_overrides,
                           "run.device=cpu", "train.eval_prompts=0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "rank0.json").read_text())
    assert len(record["step_s"]) == 1 and record["step_s"][0] > 0
    assert record["cuda_peak_allocated_gb"] is None and "policy_loss" in record["last_metrics"]


def test_report_renders_the_steps_outputs(tmp_path):
    """The report from a folder of step outputs (stand-in numbers, written to tmp_path only)."""
    out, results = tmp_path / "out", tmp_path / "results"
    (out / "demo").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no report"):  # the run stopped before the GPUs were known
        gpu_acceptance.cmd_report(out, results)
    assert not results.exists()
    info = {"date": "2030-01-02", "host": "h", "python": "3.11", "torch": "2.13.0", "cuda": "13.0",
            "driver": "580.1", "nccl": "2.29.7", "gpus": [{"index": 0, "name": "NVIDIA H200",
                                                            "capability": "sm_90", "memory_gb": 150.0}],
            "triton": "3.7.1", "flash-attn": "not installed", "deepspeed": "0.19.8",
            "megatron-core": "0.16.1", "nvidia-ml-py": "13.615.71"}
    (out / "info.json").write_text(json.dumps(info))
    (out / "peak.json").write_text(json.dumps({"device": "NVIDIA H200",
                                               "flops": {"bfloat16": 7e14, "float32": 5e13}}))
    (out / "step-fsdp2.json").write_text(json.dumps({
        "engine": "fsdp2", "ranks": 1, "step_s": 0.5, "samples_per_s": 32.0, "mfu": 0.2,
        "cuda_peak_allocated_gb": 3.25, "cuda_peak_reserved_gb": 4.5}))
    (out / "status.tsv").write_text("info\t0\t5\nkernels\t1\t60\nstep-fsdp2\t124\t300\n")
    (out / "kernels.xml").write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                                     '<testcase name="a"><skipped message="no nvcc"/></testcase>'
                                     "</testsuite></testsuites>")
    (out / "demo" / "summary.json").write_text(json.dumps({
        "steps": 10, "seconds": 30.0, "before": {"reward_mean": 0.4}, "after": {"reward_mean": 0.5,
                                                                             "num_samples": 16}}))
    path = gpu_acceptance.cmd_report(out, results)
    assert path == results / "2030-01-02-gpu-nvidia-h200.md"
    text = path.read_text()
    assert "| kernels | failed (exit 1) | 60 |" in text and "| step-fsdp2 | timed out | 300 |" in text
    assert "3 tests, 1 failed, 0 errors, 1 skipped" in text and "skipped: no nvcc" in text
    assert "| fsdp2 | 1 | 0.500 | 32.0 | 20.0% | 3.25 | 4.50 |" in text
    assert "bf16 700.0 TFLOP/s" in text and "0.400 -> 0.500 over 16 samples" in text
