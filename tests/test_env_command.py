"""`ddrl env`: every field on a CPU host ("not installed" / "none" where absent), and --json parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddrl_scale.cli import main
from ddrl_scale.telemetry import env_report

REPO = Path(__file__).resolve().parents[1]
FIELDS = {
    "packages": set(env_report.PACKAGES),
    "cuda": {"torch_cuda", "cudnn", "nccl", "distributed_backends", "gpus"},
    "nvml": {"status", "gpus"},
    "cpu": {"model", "logical_cores", "torch_capability", "isa"},
    "backends": {"device", "attention", "kernels"},
}
TOP = {"ddrl_scale", "python", "platform", "slurm", "launch", "config", *FIELDS}


def test_json_has_every_field_and_parses():
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NNODES="2", LOCAL_RANK="0")
    done = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", "env", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report) == TOP
    for section, keys in FIELDS.items():
        assert set(report[section]) == keys, section
    assert report["slurm"] == {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}
    assert report["launch"]["LOCAL_RANK"] == "0"
    assert report["packages"]["torch"].split("+")[0].count(".") == 2
    backends = report["backends"]
    assert backends["attention"]["chosen"] in ("sdpa", "flash") and backends["attention"]["why"]
    assert backends["kernels"]["chosen"] in ("torch", "compile", "triton", "cuda")
    assert set(backends["kernels"]["backends"]) == {"torch", "compile", "triton", "cuda"}


def test_text_prints_every_field_with_none_where_absent(capsys, monkeypatch):
    for key in [key for key in os.environ if key.startswith("SLURM_")] + list(env_report.LAUNCH_VARIABLES):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(env_report, "PACKAGES", (*env_report.PACKAGES, "surely-not-a-package-here"))
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    keys = {line.strip().split(":")[0] for line in out.splitlines() if ":" in line}
    for section, fields in FIELDS.items():
        assert section in keys and fields <= keys | set(env_report.PACKAGES), section
    assert "surely-not-a-package-here: not installed" in out
    assert "slurm: none" in out and "launch: none" in out
    if not torch.cuda.is_available():
        assert "gpus: none" in out and "torch_cuda: none" in out


def test_backends_follow_the_config_and_name_what_is_missing():
    from ddrl_scale.config import load_config

    if torch.cuda.is_available():
        pytest.skip("the host has a GPU")
    report = env_report.backend_report(load_config(None, ["run.device=cuda"]))
    assert report["device"].startswith("none: run.device=cuda") and "sees no CUDA device" in report["device"]
    report = env_report.backend_report(load_config(None, ["kernels.backend=torch",
                                                          "model.attention_backend=sdpa"]))
    assert report["kernels"]["chosen"] == "torch"
    assert report["attention"] == {"requested": "sdpa", "chosen": "sdpa", "why": "requested"}
    assert "CUDA" in report["kernels"]["backends"]["cuda"]


def test_cpu_isa_flags_from_cpuinfo():
    cpuinfo = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
               "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
               "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    report = env_report.cpu_report(cpuinfo)
    assert report["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert report["isa"] == {"avx2": "yes", "avx512f": "yes", "avx512_bf16": "yes", "amx_tile": "yes",
                             "amx_bf16": "yes", "amx_int8": "no"}
    assert env_report.cpu_report("")["isa"].startswith("none")


class FakeNVML:
    """pynvml's interface for two GPUs: one with 18 active NVLink links, one PCIe-only."""

    NVML_NVLINK_MAX_LINKS = 18

    class NotSupported(Exception):
        pass

    def __init__(self):
        self.shut_down = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self):
        return b"570.86.15"

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H200" if handle == 0 else "NVIDIA L40S"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"total": 141e9 if handle == 0 else 48e9})()

    def nvmlDeviceGetNvLinkState(self, handle, link):
        if handle == 1:
            raise self.NotSupported
        return 1


def test_nvml_gpus_with_memory_and_nvlink():
    nvml = FakeNVML()
    report = env_report.nvml_report(nvml)
    assert report["status"] == "driver 570.86.15" and nvml.shut_down
    assert report["gpus"][0] == {"index": 0, "name": "NVIDIA H200", "memory_gb": 141.0,
                                 "nvlink_active_links": 18}
    assert report["gpus"][1]["nvlink_active_links"].startswith("none")

    class Broken(FakeNVML):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    assert env_report.nvml_report(Broken())["status"].startswith("not usable (RuntimeError")
