"""DDRL training with a reward served by `ddrl reward-serve`: the same run as with the in-process
reward (float32 wire: identical scores), and a server killed mid-run ends the run with an error
naming the service instead of a hang."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _TINY

from ddrl_scale.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOKEN = "training-token-0123456789"
KEYS = ("loss", "policy_loss", "data_loss", "reward_mean", "reward_caption_alignment_mean")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", DDRL_REWARD_TOKEN=TOKEN)


@pytest.fixture
def server():
    process = subprocess.Popen(
        [sys.executable, "-m", "ddrl_scale.cli", "reward-serve", "--reward", "caption_alignment",
         "--port", "0"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    url, deadline = None, time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"listening on (http://\S+)", line)
        url = match.group(1) if match else None
    if url is None:
        process.kill()
        pytest.fail("reward-serve printed no address")
    yield process, url
    if process.poll() is None:
        process.kill()
    process.wait(10)


def _train(overrides: list[str], tmp_path: Path, name: str, shards: Path, check: bool = True
           ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ddrl_scale.cli", "train", "configs/demo_cpu.yaml", *_TINY,
               f"data.generated_dir={shards}", f"run.output_dir={tmp_path / name}",
               "train.eval_prompts=0", *overrides]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def _remote(url: str, **extra: str) -> list[str]:
    args = {"url": url, "wire_dtype": "float32", **extra}
    return ["rewards.0.name=remote", *[f"rewards.0.args.{k}={v}" for k, v in args.items()]]


def _assert_same_run(remote_dir: Path, local_dir: Path, rel: float, abs: float) -> None:
    """KEYS of every step equal; the remote entry is named "remote": its mean is the
    caption_alignment mean of the local run."""
    local, remote = (read_metrics(d / "metrics.jsonl") for d in (local_dir, remote_dir))
    assert [r["step"] for r in remote] == [1, 2, 3]
    for mine, theirs in zip(remote, local):
        mine = {**mine, "reward_caption_alignment_mean": mine["reward_remote_mean"]}
        assert {k: mine[k] for k in KEYS} == pytest.approx({k: theirs[k] for k in KEYS},
                                                           rel=rel, abs=abs)


def test_remote_reward_trains_like_the_in_process_reward(server, tmp_path: Path,
                                                          shared_shards_dir: Path):
    _, url = server
    _train([], tmp_path, "local", shared_shards_dir)
    _train(_remote(url), tmp_path, "remote", shared_shards_dir)
    _assert_same_run(tmp_path / "remote", tmp_path / "local", rel=1e-6, abs=1e-7)


def test_a_dead_reward_service_stops_the_run_naming_it(server, tmp_path: Path, shared_shards_dir: Path):
    process, url = server
    process.kill()
    process.wait(10)
    start = time.monotonic()
    done = _train(_remote(url, retries="2", backoff_s="0.1", timeout_s="5"), tmp_path, "dead",
                  shared_shards_dir, check=False)
    assert done.returncode != 0
    assert url in done.stderr and "3 attempts" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - start < 120


def test_rollout_rank_scores_through_the_service_like_the_local_reward(
        server, tmp_path: Path, shared_shards_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """1 trainer + 1 rollout rank; the rollout rank scores on its scoring thread through the
    service: the same losses as the in-process reward in one process."""
    from test_distributed import _run

    _, url = server
    monkeypatch.setenv("DDRL_REWARD_TOKEN", TOKEN)
    base = [*_TINY, f"data.generated_dir={shared_shards_dir}", "train.eval_prompts=0"]
    _train([], tmp_path, "local", shared_shards_dir)
    _run([*base, *_remote(url), "rollout.mode=disaggregated", f"run.output_dir={tmp_path / 'split'}"],
         2, tmp_path / "split.log")
    _assert_same_run(tmp_path / "split", tmp_path / "local", rel=1e-5, abs=1e-6)
