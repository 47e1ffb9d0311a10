"""What every benchmark shares: the machine's description and the dated result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores{gpu}, "
            f"torch {torch.__version__}")


def write_results(name: str, result: dict, markdown: str) -> Path:
    """benchmarks/results/<date>-<name>-<arch>-<cores>cpu.{json,md}; prints the report and paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (f"{datetime.date.today().isoformat()}-{name}-{platform.machine()}-"
                      f"{os.cpu_count()}cpu")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"written: {stem}.json / .md")
    return stem
