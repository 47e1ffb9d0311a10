"""`ddrl data validate` and `ddrl data stats`: check prepared latent shards against their index.

Place in the data flow (docs/architecture.md): after `prepare`, before training on the shards.

validate: every shard listed in `index.json` exists with the recorded size and SHA-256; every sample
of its sidecar is in the tar in order, decodes (no pickle), has the recorded shape and dtype, finite
values, a caption, and the recorded checksum of its tensor member; no sample is in the tar that the
index does not list. Problems are listed by shard and key.
stats: sample, shard and byte counts and the shape buckets from the index; with `scan`, per-channel
latent mean / std and caption lengths read from the shards.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddrl_scale.data import latent_shards as fmt


@dataclass
class Problem:
    shard: str
    key: str  # "" for a problem of the whole shard
    reason: str


@dataclass
class ShardReport:
    shard: str
    samples_ok: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class ValidationReport:
    index_url: str
    num_shards: int
    num_samples: int  # listed in the index
    samples_ok: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_keys(self) -> list[tuple[str, str]]:
        return sorted({(problem.shard, problem.key) for problem in self.problems if problem.key})

    def summary(self) -> str:
        lines = [f"{self.index_url}: {self.num_shards} shards, {self.samples_ok}/{self.num_samples} "
                 f"samples ok, {len(self.problems)} problems"]
        lines += [f"  {problem.shard} {problem.key or '(shard)'}: {problem.reason}"
                  for problem in self.problems]
        return "\n".join(lines)


def resolve_index(root_or_index: str) -> str:
    """A prepared folder -> its index.json; an index path or URL as is."""
    path = Path(root_or_index)
    if path.is_dir():
        index = path / fmt.INDEX_NAME
        if not index.is_file():
            raise FileNotFoundError(f"'{root_or_index}' has no {fmt.INDEX_NAME} (is prepare finished?)")
        return str(index)
    if fmt.is_local(root_or_index) and not path.is_file():
        raise FileNotFoundError(f"index '{root_or_index}' does not exist")
    return root_or_index


def _check_sample(raw: fmt.RawSample, expected: dict) -> str | None:
    if raw.key != expected["key"]:
        return f"key '{raw.key}' where the index lists '{expected['key']}'"
    try:
        sample = fmt.decode_sample(raw.key, raw.members)
    except fmt.ShardFormatError as error:
        return str(error)
    member = fmt.tensor_member(raw.members)
    if list(sample.tensor.shape) != list(expected["shape"]):
        return f"shape {list(sample.tensor.shape)} where the index records {expected['shape']}"
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(sample.tensor.dtype, str(sample.tensor.dtype))
    if dtype != expected["dtype"]:
        return f"dtype {dtype} where the index records {expected['dtype']}"
    if fmt.sha256_bytes(raw.members[member]) != expected["sha256"]:
        return f"checksum of {member} differs from the index"
    return None


def validate_shard(shard_url: str, entry: dict, sidecar_url: str | None) -> ShardReport:
    report = ShardReport(shard_url)
    name = entry["name"]
    if fmt.is_local(shard_url):
        path = Path(shard_url)
        if not path.is_file():
            report.problems.append(Problem(name, "", "shard file is missing"))
            return report
        if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
            report.problems.append(Problem(name, "", f"size {path.stat().st_size} bytes, the index "
                                                     f"records {entry['bytes']}"))
        elif entry.get("sha256") and fmt.sha256_file(path) != entry["sha256"]:
            report.problems.append(Problem(name, "", "SHA-256 of the shard differs from the index"))
    try:
        expected = fmt.load_sidecar(sidecar_url)["samples"] if sidecar_url else None
    except (OSError, fmt.ShardFormatError) as error:
        report.problems.append(Problem(name, "", f"sidecar unreadable ({error})"))
        expected = None
    seen = 0
    for raw in fmt.iter_shard(shard_url):
        if raw.error:
            key = raw.key
            if key == "?" and expected is not None and raw.index < len(expected):
                key = expected[raw.index]["key"]  # the tar broke before naming it: the index does
            report.problems.append(Problem(name, key, raw.error))
            seen = raw.index + 1
            break
        seen = raw.index + 1
        if expected is not None and raw.index >= len(expected):
            report.problems.append(Problem(name, raw.key, "sample is not listed in the index"))
            continue
        if expected is None:
            try:
                fmt.decode_sample(raw.key, raw.members)
            except fmt.ShardFormatError as error:
                report.problems.append(Problem(name, raw.key, str(error)))
                continue
            report.samples_ok += 1
            continue
        reason = _check_sample(raw, expected[raw.index])
        if reason:
            report.problems.append(Problem(name, raw.key, reason))
        else:
            report.samples_ok += 1
    listed = len(expected) if expected is not None else entry["num_samples"]
    for missing in range(seen, listed):
        key = expected[missing]["key"] if expected is not None else f"#{missing}"
        report.problems.append(Problem(name, key, "listed in the index but missing from the shard"))
    return report


def _validate_job(job: tuple) -> ShardReport:
    return validate_shard(*job)


def validate(root_or_index: str, workers: int = 1) -> ValidationReport:
    """Check every shard of a prepared folder (or an index URL) in `workers` processes."""
    index_url = resolve_index(root_or_index)
    index = fmt.load_index(index_url)
    jobs = [(fmt.join_url(index_url, entry["name"]), entry,
             fmt.join_url(index_url, entry["sidecar"]) if entry.get("sidecar") else None)
            for entry in index["shards"]]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with context.Pool(min(workers, len(jobs))) as pool:
            reports = pool.map(_validate_job, jobs)
    else:
        reports = [_validate_job(job) for job in jobs]
    return ValidationReport(index_url, len(jobs), int(index.get("num_samples", 0)),
                            sum(report.samples_ok for report in reports),
                            [problem for report in reports for problem in report.problems])


def stats(root_or_index: str, scan: bool = False) -> dict:
    """Counts from the index; with `scan`, latent channel statistics and caption lengths too."""
    index_url = resolve_index(root_or_index)
    index = fmt.load_index(index_url)
    shapes: dict[str, int] = {}
    for entry in index["shards"]:
        for name, count in entry.get("shapes", {}).items():
            shapes[name] = shapes.get(name, 0) + count
    total_bytes = sum(int(entry.get("bytes") or 0) for entry in index["shards"])
    result = {"index": index_url, "num_shards": len(index["shards"]), "num_samples": index["num_samples"],
              "num_skipped_inputs": index.get("num_skipped", 0), "total_bytes": total_bytes,
              "bytes_per_sample": total_bytes / max(1, index["num_samples"]), "shapes": shapes,
              "params": index.get("params", {})}
    if scan:
        result.update(_scan(index_url, index))
    return result


def _scan(index_url: str, index: dict) -> dict:
    sums: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    count, words, unreadable = 0, [], 0
    for entry in index["shards"]:
        for raw in fmt.iter_shard(fmt.join_url(index_url, entry["name"])):
            try:
                sample = fmt.decode_sample(raw.key, raw.members) if raw.error is None else None
            except fmt.ShardFormatError:
                sample = None
            if sample is None:
                unreadable += 1
                continue
            latents = sample.tensor.double().flatten(1)  # (C, T H W)
            if sums is None or sums.shape[0] != latents.shape[0]:
                if sums is not None:
                    continue  # channel counts differ between samples: statistics of the first kind
                sums, squares = torch.zeros(latents.shape[0], dtype=torch.float64), torch.zeros(
                    latents.shape[0], dtype=torch.float64)
            sums += latents.sum(1)
            squares += latents.square().sum(1)
            count += latents.shape[1]
            words.append(len(sample.caption.split()))
    if sums is None:
        return {"samples_scanned": 0, "unreadable": unreadable}
    mean = sums / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return {"samples_scanned": len(words), "unreadable": unreadable,
            "channel_mean": [round(float(v), 6) for v in mean],
            "channel_std": [round(float(v), 6) for v in std],
            "caption_words": {"mean": sum(words) / len(words), "min": min(words), "max": max(words)}}
