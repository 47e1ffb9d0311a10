"""Ctrl-C and SIGTERM during `ddrl train`: the step in progress finishes, is checkpointed, the run
says how to resume and exits 130 / 143; a rerun continues with every step once. A second Ctrl-C
exits at once; the ranks agree on the request, with the vote on the world's device."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ddrl_scale.parallel.distributed import World
from ddrl_scale.train import preemption
from ddrl_scale.train.checkpoint import latest_checkpoint
from ddrl_scale.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 240  # generous: a loaded CI machine is slow, and nothing here waits for a fixed time


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _ddrl(*args: str, **kwargs) -> subprocess.Popen:
    # its own session, so that the test can signal its process group as a terminal's Ctrl-C does
    return subprocess.Popen([sys.executable, "-m", "ddrl_scale.cli", *args], cwd=REPO, env=_env(),
                            start_new_session=True, **kwargs)


def _wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert process.poll() is None, f"the process ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.05)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [record["step"] for record in read_metrics(path)] if path.is_file() else []


def _interrupt(command: list[str], run_dir: Path, signum: int, tmp_path: Path) -> tuple[str, str, int]:
    """Start `ddrl ...command`, send `signum` to its process group once a step beyond those already
    on disk has finished, and return (stdout, stderr, status)."""
    out, err, done = tmp_path / "out.txt", tmp_path / "err.txt", len(_steps(run_dir))
    with out.open("w") as stdout, err.open("w") as stderr:
        process = _ddrl(*command, stdout=stdout, stderr=stderr)
        try:
            _wait_until(lambda: len(_steps(run_dir)) > done, process, "a new step")  # in the step loop
            os.killpg(process.pid, signum)
            status = process.wait(timeout=WAIT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return out.read_text(), err.read_text(), status


def test_sigint_and_sigterm_checkpoint_the_last_finished_step_and_the_rerun_resumes(tiny_overrides,
                                                                                    tmp_path):
    """Ctrl-C, then SIGTERM to the rerun of the same command, then a rerun that finishes: each
    interrupted run leaves the checkpoint of its last finished step and one line saying how to
    resume, and the metrics hold every step once."""
    run_dir = tmp_path / "run"
    # a DataLoader worker process shares the terminal's process group and inherits the handlers;
    # more steps than it can run before the signal: the signal, not train.steps, ends it
    command = ["train", "configs/demo_cpu.yaml", *tiny_overrides, "kernels.backend=torch",
               "data.split=sharded", "data.num_workers=1", "train.steps=100000"]
    for signum, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        stdout, stderr, status = _interrupt(command, run_dir, signum, tmp_path)
        assert status == expected, stderr[-3000:]
        steps = _steps(run_dir)
        last = steps[-1]
        assert steps == list(range(1, last + 1))
        assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{last:06d}"
        assert stdout.strip() == f"interrupted at step {last}; rerun the same command to resume"
        assert "Traceback" not in stderr
        assert stderr.count("stopping after the step in progress") == 1, stderr[-3000:]  # rank 0 only
        assert not (run_dir / "summary.json").exists()  # the evaluation after training is the rerun's

    rerun = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", *command[:-1], f"train.steps={last + 2}"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {last}" in rerun.stderr  # "resumed from ... at step N"
    assert _steps(run_dir) == list(range(1, last + 3))  # none lost, none repeated
    assert (run_dir / "summary.json").is_file()


LONG_STEP = """
import time
from ddrl_scale.train import preemption

with preemption.handle_signals(), preemption.graceful():
    print("in a step", flush=True)
    while True:  # a step that never ends: only the second Ctrl-C can end this process
        time.sleep(0.01)
"""


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    err = tmp_path / "err.txt"
    with err.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", LONG_STEP], cwd=REPO, env=_env(),
                                   stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   start_new_session=True)
        try:
            assert process.stdout.readline().strip() == "in a step"
            os.killpg(process.pid, signal.SIGINT)
            _wait_until(lambda: "stopping after the step in progress" in err.read_text(), process,
                        "the first interrupt's notice")
            time.sleep(preemption.DUPLICATE_S + 0.2)  # a person's second press, not a forwarded copy
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(timeout=WAIT_S) == 130
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert "second interrupt: stopping now" in err.read_text()


# -- the handler and the vote, in this process ------------------------------------------------------
class _Exited(Exception):
    pass


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch):
    """A fresh handler state inside a step loop, a clock the test sets and os._exit caught."""
    fresh = preemption._State(handling=True, graceful=True)
    monkeypatch.setattr(preemption, "_state", fresh)
    clock = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])

    def fake_exit(status: int) -> None:
        raise _Exited(status)

    monkeypatch.setattr(preemption.os, "_exit", fake_exit)
    return fresh, clock


def test_copies_of_the_first_signal_are_one_request_a_later_ctrl_c_exits(state):
    fresh, clock = state
    preemption._on_signal(signal.SIGINT, None)
    clock[0] += 0.01  # torchrun's forwarded copy, then the scheduler's SIGTERM: the same request
    preemption._on_signal(signal.SIGINT, None)
    preemption._on_signal(signal.SIGTERM, None)
    assert preemption.exit_code() == 130
    clock[0] += preemption.DUPLICATE_S + 0.5
    preemption._on_signal(signal.SIGTERM, None)  # a repeated SIGTERM never escalates
    with pytest.raises(_Exited) as exited:
        preemption._on_signal(signal.SIGINT, None)
    assert exited.value.args == (130,)


def test_outside_the_step_loop_a_signal_raises_interrupted(state):
    fresh, _ = state
    fresh.graceful = False
    with pytest.raises(preemption.Interrupted) as raised:
        preemption._on_signal(signal.SIGTERM, None)
    assert raised.value.exit_code == 143
    preemption._on_signal(signal.SIGUSR1, None)  # a preemption warning never raises
    assert preemption.exit_code() == 143


def test_run_training_reports_an_interruption_outside_the_loop(tiny_overrides, monkeypatch):
    """Interrupted during model building or an evaluation: the step of the last checkpoint."""
    from ddrl_scale.config import load_config
    from ddrl_scale.train import run

    config = load_config(None, tiny_overrides)
    (Path(config.run.output_dir) / "checkpoints" / "step_000004").mkdir(parents=True)
    (Path(config.run.output_dir) / "checkpoints" / "step_000004" / "trainer_state.pt").touch()

    def interrupted(config):
        raise preemption.Interrupted(signal.SIGINT)

    monkeypatch.setattr(run, "_run_training", interrupted)
    before = signal.getsignal(signal.SIGINT)
    summary = run.run_training(config)
    assert summary == {"steps": 4, "interrupted": True, "exit_code": 130}
    assert run.describe(summary, config.run.output_dir) == \
        "interrupted at step 4; rerun the same command to resume"
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back


def test_the_stop_vote_runs_on_the_worlds_device(tmp_path, monkeypatch):
    """NCCL all-reduces only CUDA tensors: the vote's tensor is on the world's device (meta here,
    which no CPU default can pass for)."""
    seen = []

    class Seen(Exception):  # not a RuntimeError: collective() passes it through unchanged
        pass

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        raise Seen

    monkeypatch.setattr(preemption.dist, "all_reduce", all_reduce)
    # no process group here: a backend collective() knows no device for, so its device check
    # (tested in test_zz_gpu_readiness.py) lets the vote through to the stand-in all_reduce
    monkeypatch.setattr(preemption.dist, "get_backend", lambda group=None: "fake")
    world = World(rank=0, world_size=2, local_rank=0, device=torch.device("meta"))
    with pytest.raises(Seen):
        preemption.StopRequest(tmp_path, world).requested()
    assert seen == [torch.device("meta")]


def _vote_in_rank(rank: int, store: str, code: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    stop = preemption.StopRequest(Path(store).parent, World(rank=rank, world_size=2))
    preemption._state.request = code  # what this rank received
    results.put((rank, stop.requested(), stop.code, preemption.exit_code()))
    dist.destroy_process_group()


def test_the_ranks_agree_on_the_strongest_request(tmp_path):
    """Rank 1 got SIGINT, rank 0 only SIGTERM: both stop, and both exit 130."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    codes = {0: preemption.TERMINATE, 1: preemption.INTERRUPT}
    processes = [context.Process(target=_vote_in_rank, args=(rank, str(tmp_path / "store"),
                                                             codes[rank], results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=WAIT_S)
        assert process.exitcode == 0
    answers = sorted(results.get(timeout=10) for _ in range(2))
    assert answers == [(0, True, preemption.INTERRUPT, 130), (1, True, preemption.INTERRUPT, 130)]


# -- the launchers ----------------------------------------------------------------------------------
def test_the_sbatch_script_passes_sigterm_to_the_ranks_and_gives_them_time():
    from ddrl_scale.config import load_config
    from ddrl_scale.launch.slurm import render

    script = render(load_config("configs/demo_cpu.yaml", ["parallel.engine=fsdp2"]),
                    "/runs/x/launch/config.yaml", None, "")
    assert "trap 'stop_training SIGTERM' TERM" in script and "trap 'stop_training SIGINT' INT" in script
    assert 'kill -TERM "$SRUN_PID"' in script
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in script
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_the_batch_shell_forwards_sigterm_and_waits_for_the_trainer(tmp_path):
    """The template's trap and wait loop, run by bash with stand-ins for srun and scontrol: SIGTERM
    to the batch shell reaches the trainer once, the shell waits for it, keeps its status (143)
    and does not requeue."""
    from ddrl_scale.config import load_config
    from ddrl_scale.launch.slurm import render

    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    # srun: runs a "trainer" that, on SIGTERM, takes a moment (its step), then exits 143
    (bin_dir / "srun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        exec {sys.executable} -c '
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (open("{tmp_path}/got_term", "a").write("x"),
                                                   time.sleep(0.5), sys.exit(143)))
        open("{tmp_path}/started", "w").close()
        while True:
            time.sleep(0.01)'
        """))
    (bin_dir / "scontrol").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        [ "$1" = requeue ] && touch {tmp_path}/requeued
        [ "$1" = show ] && echo n1
        exit 0
        """))
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    config = load_config("configs/demo_cpu.yaml", ["parallel.engine=fsdp2", f"run.output_dir={run_dir}",
                                                   f"launch.log_dir={tmp_path / 'logs'}"])
    script = tmp_path / "job.sh"
    script.write_text(render(config, str(tmp_path / "config.yaml"), None, ""))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1", SLURM_NODEID="0")
    with (tmp_path / "batch.log").open("w") as log:
        shell = subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until(lambda: (tmp_path / "started").exists(), shell, "the trainer's start")
            shell.send_signal(signal.SIGTERM)
            assert shell.wait(timeout=WAIT_S) == 143, (tmp_path / "batch.log").read_text()
        finally:
            if shell.poll() is None:
                shell.kill()
    assert (tmp_path / "got_term").read_text() == "x"
    assert not (tmp_path / "requeued").exists()
    assert "SIGTERM: asking the trainer to checkpoint" in (tmp_path / "batch.log").read_text()
