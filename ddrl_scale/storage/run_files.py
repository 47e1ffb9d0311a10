"""Crash-consistent run files: what a run writes beside its checkpoints survives kill -9 or a power cut.

Place in the data flow: the trainer's metrics, the run's config, evaluations and summary, and the
rollout ranks' status files all go through here. Two rules:

* a file that is rewritten (config.yaml, eval_*.json, summary.json, metrics.jsonl on resume,
  rollout/worker*.json) is written to a temporary file beside it and renamed over it
  (`os.replace`), so a reader sees the old or the new file, never half of one;
* a file that is appended to (metrics.jsonl) can end in a torn line (the process died inside a
  write, or the disk filled): `read_jsonl` drops a torn last line with a warning and keeps the
  others; a bad line elsewhere is corruption, and an error names the file and line.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # the data is on disk before the rename makes it visible
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: dict, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per line. A torn last line (no newline at its end,
    or not valid JSON) is dropped with a warning; any other unreadable line raises ValueError
    naming the file and line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if all(not rest.strip() for rest in lines[number:]):  # the last line: torn
                logger.warning("%s: dropping a torn last line %d (%s): %.80r", path, number, error, line)
                break
            raise ValueError(f"'{path}' line {number} is not valid JSON ({error}); only a torn last "
                             f"line is dropped") from None
        if not isinstance(record, dict):
            raise ValueError(f"'{path}' line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
