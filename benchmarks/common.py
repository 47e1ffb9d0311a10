"""What every benchmark shares: the machine's description, the dated result files, tiny settings."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# `ddrl bench` points every part at its own folder, so a suite run never overwrites the reports a
# person wrote with a single script on the same day
RESULTS_ENV = "DDRL_BENCH_RESULTS"

# a DiT and run small enough that a DDRL step takes well under a second on one core: the --quick
# settings of the scripts (the same shape as tests/conftest.py's tiny run)
TINY_OVERRIDES = [
    "model.init_checkpoint=none", "model.hidden_size=12", "model.depth=1", "model.num_heads=2",
    "model.text_dim=8", "model.max_text_tokens=12", "model.patch_size=[2,4,4]", "video.num_frames=4",
    "video.height=8", "video.width=8", "sampler.num_steps=4", "algo.group_size=2",
    "algo.prompts_per_step=2", "data.num_generated=16", "data.samples_per_shard=8",
    "data.shuffle_buffer=4",
]


def results_dir() -> Path:
    """Where results go: $DDRL_BENCH_RESULTS when set, else benchmarks/results."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores{gpu}, "
            f"torch {torch.__version__}")


def write_results(name: str, result: dict, markdown: str) -> Path:
    """<results>/<date>-<name>-<arch>-<cores>cpu.{json,md} (results_dir()); prints the report and
    the paths (`ddrl bench` reads the `written:` line)."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / (f"{datetime.date.today().isoformat()}-{name}-{platform.machine()}-"
                     f"{os.cpu_count()}cpu")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"written: {stem}.json / .md")
    return stem
