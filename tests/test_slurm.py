"""Integration tests against a real SLURM (marker `slurm`): launchers/slurm/local_cluster.sh brings
up a 2-node cluster on this machine (root, Debian packages); `ddrl launch slurm` submits to it.

Run with `pytest -m slurm` (`.ci/run` does). A job is waited for by polling `scontrol show job`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _TINY

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launchers" / "slurm" / "local_cluster.sh"
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get for SLURM"),
]


@pytest.fixture(scope="module")
def cluster():
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:  # also after a failed bring-up: stop whatever it started
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ddrl_scale.config import load_config
    from ddrl_scale.train.anchor_data import demo_shards

    folder = tmp_path_factory.mktemp("slurm") / "shards"
    demo_shards(load_config(None, [*_TINY, f"data.generated_dir={folder}"]))
    return folder


def _launch(run_dir: Path, *extra: str) -> tuple[subprocess.CompletedProcess, str | None]:
    done = subprocess.run(
        [sys.executable, "-m", "ddrl_scale.cli", "launch", "slurm", "configs/demo_cpu.yaml",
         *_TINY, "parallel.engine=fsdp2", "launch.nodes=2", f"run.output_dir={run_dir}",
         f"launch.log_dir={run_dir / 'logs'}", "train.eval_prompts=0", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    match = re.search(r"submitted job (\d+)", done.stdout)
    return done, match.group(1) if match else None


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
          timeout: float = 240) -> dict[str, str]:
    deadline, settled = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        info = _job(job)
        # a requeue passes through a short terminal-looking state: only a state that holds for
        # 3 s counts as the end
        settled = [*settled, info.get("JobState")] if info.get("JobState") in states else []
        if len(settled) >= 7 and len(set(settled[-7:])) == 1:
            return info
        time.sleep(0.5)
    pytest.fail(f"job {job} still {_job(job).get('JobState')} after {timeout} s")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*")))


def test_two_node_job_completes(cluster, shards, tmp_path):
    """The demo, as a real 2-node job (one torchrun per node, fsdp2 over 2 ranks), runs to the end."""
    run_dir = tmp_path / "run"
    done, job = _launch(run_dir, f"data.generated_dir={shards}", "train.steps=3")
    assert job, done.stdout + done.stderr
    info = _wait(job)
    assert info["JobState"] == "COMPLETED", _logs(run_dir)
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    assert _steps(run_dir) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_000003" / "trainer_state.pt").is_file()
    assert {p.name for p in (run_dir / "logs").glob("*-node*.out")} == {
        f"ddrl-{job}-node0.out", f"ddrl-{job}-node1.out"}


def test_preemption_warning_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    """USR1 to the batch shell: the trainer checkpoints, the job requeues itself, the requeued job
    resumes from that checkpoint; every step appears exactly once."""
    run_dir = tmp_path / "run"
    done, job = _launch(run_dir, f"data.generated_dir={shards}", "train.steps=24",
                        "sampler.num_steps=8", "train.save_every=4")
    assert job, done.stdout + done.stderr
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step_000004").is_dir():
        assert time.monotonic() < deadline and _job(job).get("JobState") in ("PENDING", "RUNNING"), \
            _logs(run_dir)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.monotonic() + 120
    while _job(job).get("Restarts") != "1":  # the trainer checkpoints, then the script requeues
        assert time.monotonic() < deadline, _logs(run_dir)
        time.sleep(0.2)
    info = _wait(job)
    assert info["JobState"] == "COMPLETED", _logs(run_dir)
    assert info["Restarts"] == "1", _logs(run_dir)
    batch_log = (run_dir / "logs" / f"ddrl-{job}.out").read_text()
    assert "requeueing job" in batch_log and "restart 1" in batch_log, batch_log
    assert _steps(run_dir) == list(range(1, 25)), _logs(run_dir)  # none lost, none repeated
    # rank 0 may sit on either node (the c10d rendezvous orders the nodes itself)
    node_logs = "".join(p.read_text() for p in (run_dir / "logs").glob(f"ddrl-{job}-node*.out"))
    assert re.search(r"resumed from \S+step_0000\d\d at step \d+", node_logs), node_logs[-3000:]


def test_chain_runs_dependent_jobs_that_continue_the_run(cluster, shards, tmp_path):
    """--chain 2: the second job waits for the first (afterany) and resumes its last checkpoint."""
    run_dir = tmp_path / "run"
    done, _ = _launch(run_dir, f"data.generated_dir={shards}", "train.steps=2", "--chain", "2")
    jobs = re.findall(r"submitted job (\d+)", done.stdout)
    assert len(jobs) == 2, done.stdout + done.stderr
    assert _job(jobs[1]).get("Dependency", "").startswith(f"afterany:{jobs[0]}")
    for job in jobs:
        assert _wait(job)["JobState"] == "COMPLETED", _logs(run_dir)
    assert _steps(run_dir) == [1, 2]
    second = "".join(p.read_text() for p in (run_dir / "logs").glob(f"ddrl-{jobs[1]}-node*.out"))
    assert re.search(r"resumed from \S+step_000002 at step 2", second), second[-3000:]


@pytest.mark.parametrize("copy", [
    pytest.param([], id="whole-copy"),
    # 2 fsdp2 trainers on n1, a tensor-parallel rollout copy over n2's 2 ranks
    pytest.param(["launch.nproc_per_node=2", "rollout.tp_size=2"], id="tp2-copy"),
])
def test_rollout_node_serves_the_trainer_node(cluster, shards, tmp_path, copy):
    """launch.rollout_nodes=1: node n2 runs the rollout ranks, n1 the trainers; the run finishes with
    checksum-verified publishes."""
    run_dir = tmp_path / "run"
    done, job = _launch(run_dir, f"data.generated_dir={shards}", "train.steps=3",
                        "launch.rollout_nodes=1", "rollout.verify_publish=true", *copy)
    assert job, done.stdout + done.stderr
    info = _wait(job)
    assert info["JobState"] == "COMPLETED", _logs(run_dir)
    assert _steps(run_dir) == [1, 2, 3]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["publish_checksum_ok"] == 1.0 and r["policy_lag"] == 0 for r in records)
    for index in range(2 if copy else 1):
        worker = json.loads((run_dir / "rollout" / f"worker{index}.json").read_text())
        assert worker["slurm_node"] == "n2" and worker["state"] == "stopped", worker
        assert worker["tp_size"] == (2 if copy else 1), worker


def test_reward_node_hosts_the_reward_service(cluster, shards, tmp_path):
    """launch.reward_nodes=1: n2 runs `ddrl reward-serve`, the trainer on n1 scores through it."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, DDRL_REWARD_TOKEN="slurm-test-token-0123456789")
    done = subprocess.run(
        [sys.executable, "-m", "ddrl_scale.cli", "launch", "slurm", "configs/demo_cpu.yaml", *_TINY,
         "parallel.engine=none", "launch.nodes=2", "launch.reward_nodes=1",
         "launch.reward_args=--reward caption_alignment", "launch.reward_port=18400",
         "rewards.0.name=remote", f"run.output_dir={run_dir}", f"launch.log_dir={run_dir / 'logs'}",
         "train.eval_prompts=0", "train.steps=2", f"data.generated_dir={shards}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    job = re.search(r"submitted job (\d+)", done.stdout)
    assert job, done.stdout + done.stderr
    info = _wait(job.group(1))
    assert info["JobState"] == "COMPLETED", _logs(run_dir)
    assert _steps(run_dir) == [1, 2]
    batch_log = (run_dir / "logs" / f"ddrl-{job.group(1)}.out").read_text()
    assert "reward service up at http://n2:18400" in batch_log, batch_log
    reward_log = (run_dir / "logs" / f"ddrl-{job.group(1)}-reward.out").read_text()
    assert "listening on" in reward_log, reward_log


@pytest.mark.parametrize(("extra", "message"), [
    (["--nodes", "3"], "Node count specification invalid|Requested node configuration is not available"),
    (["--partition", "nosuch"], "[Ii]nvalid partition"),
])
def test_impossible_requests_surface_slurms_error(cluster, tmp_path, extra, message):
    """More nodes than exist, or an unknown partition: sbatch's own message, exit 3, no job."""
    done, job = _launch(tmp_path / "run", *extra)
    assert job is None and done.returncode == 3, done.stdout + done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert "sbatch refused the job" in done.stderr
