"""Metrics stream of a run: one JSON object per line in RUN_DIR/metrics.jsonl (storage/run_files.py:
a torn last line is dropped on reading, the file is rewritten atomically on resume)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ddrl_scale.storage.run_files import atomic_write_text, read_jsonl


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # drop lines of steps after the checkpoint we resume from (they will be redone) and a
            # torn last line; the rewrite is atomic, so a crash here leaves the old file
            kept = [record for record in read_jsonl(self.path) if record.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({key: _plain(value) for key, value in record.items()}) + "\n")
        self._file.flush()
        # on disk before the step's checkpoint can be: a power cut never keeps a checkpoint of a
        # step whose line it lost
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    return read_jsonl(path)
