"""Multi-process tests on CPU (gloo): 2-rank FSDP2, HSDP, FSDP2 + context parallel, DeepSpeed
ZeRO-2/3 and Megatron-core TP=2 runs under torchrun against the single-process engine,
kill-and-resume, checkpoint resharding between world sizes, launch errors and collective timeouts.

Every run is a real `python -m ddrl_scale.cli demo ...` process (under torchrun for 2 ranks) on the
tiny config of conftest.py. One single-process reference run and one uninterrupted 2-rank FSDP2 run
are shared by the module. Tolerances: the 2-rank runs reduce gradients and metrics in a different
fp32 order than the single-process run, so they match it within REL / ABS (metrics) and
W_RTOL / W_ATOL (weights), not bitwise; a resume at the same world size is exact.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _TINY
from safetensors.torch import load_file

from ddrl_scale.config import load_config
from ddrl_scale.train.anchor_data import demo_shards
from ddrl_scale.train.checkpoint import complete_checkpoints, read_weights
from ddrl_scale.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
TIMEOUT_S = 240  # per launched run

# compared per step between runs; tolerances for the fp32 reduction-order differences
LOSS_KEYS = ("reward_mean", "policy_loss", "data_loss", "loss", "grad_norm")
REL, ABS = 1e-5, 1e-6
W_RTOL, W_ATOL = 1e-5, 1e-6
# keys that legitimately differ between two runs of the same computation (wall-clock timings,
# rates and machine telemetry)
TIMING_KEYS = ("samples_per_s", "video_tokens_per_s", "mfu", "cpu_percent", "rss_gb", "rss_gb_max")
TIMING_PREFIXES = ("time_", "gpu")

# sampler.num_steps=8 (conftest: 4) makes a step long enough (~0.5 s) for the kill test to stop the
# run between the step-2 and the step-3 checkpoints; every shared run uses it so they all compare
COMMON = ["sampler.num_steps=8", "train.eval_prompts=0", "train.steps=4", "train.save_every=1",
          "train.keep_last=10", "train.resume=auto"]
FSDP2 = ["parallel.engine=fsdp2"]


# -- launching ------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _command(overrides: list[str], nproc: int) -> list[str]:
    cli = ["-m", "ddrl_scale.cli", "demo", *overrides]
    if nproc == 1:
        return [sys.executable, *cli]
    # --standalone: c10d rendezvous on localhost with a port the store picks (no port races)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc}", *cli]


def _launch(overrides: list[str], nproc: int, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(_command(overrides, nproc), cwd=REPO, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(root: int) -> list[int]:
    """Every live descendant of `root` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its descendants (frozen first so nothing reacts in between)."""
    _signal_all([process.pid], signal.SIGSTOP)
    _signal_all(_descendants(process.pid), signal.SIGSTOP)
    _signal_all([process.pid, *_descendants(process.pid)], signal.SIGKILL)
    process.wait(timeout=30)


def _output(log: Path, limit: int = 8000) -> str:
    text = log.read_text(errors="replace") if log.is_file() else "<no output>"
    return text[-limit:]


def _run(overrides: list[str], nproc: int, log: Path, expect_ok: bool = True) -> tuple[int, str]:
    """Run to completion (killed after TIMEOUT_S); return (exit status, output)."""
    process = _launch(overrides, nproc, log)
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        pytest.fail(f"run timed out after {TIMEOUT_S} s: {_command(overrides, nproc)}\n{_output(log)}")
    output = _output(log, 10**7)
    if expect_ok:
        assert process.returncode == 0, (f"run failed (exit {process.returncode}): "
                                         f"{_command(overrides, nproc)}\n{output[-8000:]}")
    return process.returncode, output


# -- comparing ------------------------------------------------------------------------------------
def _metrics(run_dir: Path) -> dict[int, dict]:
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{run_dir}: duplicated steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in records}


def _max_diff(got: dict, want: dict, keys) -> float:
    return max(abs(got[k] - want[k]) for k in keys)


def _assert_metrics_close(got: dict[int, dict], want: dict[int, dict], steps, what: str) -> float:
    """LOSS_KEYS of `steps` within REL / ABS; returns the largest absolute difference."""
    worst = 0.0
    for step in steps:
        mine, theirs = ({k: r[step][k] for k in LOSS_KEYS} for r in (got, want))
        assert mine == pytest.approx(theirs, rel=REL, abs=ABS), f"{what}, step {step}"
        worst = max(worst, _max_diff(mine, theirs, LOSS_KEYS))
    print(f"{what}: max |metric difference| over {list(steps)} = {worst:.3g}")
    return worst


def _weights(run_dir: Path, step: int, ema: bool = False) -> dict[str, torch.Tensor]:
    return read_weights(run_dir / "checkpoints" / f"step_{step:06d}", ema=ema)


def _assert_weights_close(got_dir: Path, want_dir: Path, step: int, what: str) -> None:
    """Model and EMA weights of step `step` within W_RTOL / W_ATOL."""
    for ema in (False, True):
        got, want = _weights(got_dir, step, ema), _weights(want_dir, step, ema)
        assert got.keys() == want.keys()
        torch.testing.assert_close(got, want, rtol=W_RTOL, atol=W_ATOL,
                                   msg=lambda m, e=ema: f"{what}, step {step}, ema={e}: {m}")
        worst = max((got[k] - want[k]).abs().max().item() for k in got)
        print(f"{what}: max |weight difference| (ema={ema}) at step {step} = {worst:.3g}")


def _deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS and not k.startswith(TIMING_PREFIXES)}


# -- shared runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(shared_shards_dir: Path) -> list[str]:
    """The tiny config of every run here; its demo shards are written once, before any 2-rank run."""
    overrides = [*_TINY, *COMMON, f"data.generated_dir={shared_shards_dir}"]
    demo_shards(load_config(None, overrides))  # so that two ranks never race to write them
    return overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def reference(base: list[str], runs: Path) -> Path:
    """Single process, engine none, 4 steps, a checkpoint every step: the reference run."""
    run_dir = runs / "reference"
    _run([*base, f"run.output_dir={run_dir}"], 1, runs / "reference.log")
    return run_dir


@pytest.fixture(scope="module")
def fsdp2_run(base: list[str], runs: Path) -> Path:
    """2 ranks, fsdp2, the reference's config, uninterrupted: 4 steps, a checkpoint every step."""
    run_dir = runs / "fsdp2"
    _run([*base, *FSDP2, f"run.output_dir={run_dir}"], 2, runs / "fsdp2.log")
    return run_dir


# -- tests ----------------------------------------------------------------------------------------
def test_fsdp2_matches_single_process(reference: Path, fsdp2_run: Path):
    """fsdp2 on 2 ranks == engine none in 1 process: per-step losses and final weights (fp32 tol)."""
    got, want = _metrics(fsdp2_run), _metrics(reference)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    _assert_metrics_close(got, want, range(1, 5), "fsdp2 vs none")
    for step in range(1, 5):
        assert got[step]["ratio_max_dev"] == 0.0  # fp32 on-policy: ratios exactly 1 on every rank
        assert got[step]["lr"] == want[step]["lr"]
    _assert_weights_close(fsdp2_run, reference, 4, "fsdp2 vs none")


def test_fsdp2_reward_std_matches_single_process(reference: Path, fsdp2_run: Path):
    """reward_std of a 2-rank run is the std of the whole step's rewards, as in one process."""
    got, want = _metrics(fsdp2_run), _metrics(reference)
    for step in range(1, 5):
        assert got[step]["reward_std"] == pytest.approx(want[step]["reward_std"], rel=REL, abs=ABS)


def test_fsdp2_logs_integer_steps(reference: Path, fsdp2_run: Path):
    """metrics.jsonl 'step' and 'policy_version' are ints in a 2-rank run, as in one process."""
    for run_dir in (reference, fsdp2_run):
        for record in read_metrics(run_dir / "metrics.jsonl"):
            assert isinstance(record["step"], int), (run_dir.name, record["step"])
            assert isinstance(record["policy_version"], int), (run_dir.name, record["policy_version"])


ENGINE_VARIANTS = {
    "hsdp": [*FSDP2, "parallel.dp_replicate=2"],  # replicate 2 x shard 1
    "fsdp2-cp2": [*FSDP2, "parallel.cp=2"],  # both ranks hold the same samples, half the tokens each
    "deepspeed-zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "deepspeed-zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "megatron-tp2": ["parallel.engine=megatron", "parallel.tp=2"],  # tensor parallel 2 x data 1
    "megatron-dp2": ["parallel.engine=megatron", "parallel.tp=1"],  # data parallel 2
}
deepspeed_missing = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e .[deepspeed] with DS_BUILD_OPS=0)")

megatron_missing = pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None,
    reason="megatron-core is not installed (pip install -e .[megatron])")


@pytest.mark.parametrize("variant", [
    "hsdp", "fsdp2-cp2",
    pytest.param("deepspeed-zero2", marks=deepspeed_missing),
    pytest.param("deepspeed-zero3", marks=deepspeed_missing),
    pytest.param("megatron-tp2", marks=megatron_missing),
    pytest.param("megatron-dp2", marks=megatron_missing)])
def test_engine_matches_single_process(base: list[str], runs: Path, reference: Path, variant: str):
    """Each 2-rank engine variant == the single-process losses and weights over 3 steps (fp32 tol)."""
    run_dir = runs / variant
    _run([*base, *ENGINE_VARIANTS[variant], "train.steps=3", "train.save_every=0",
          f"run.output_dir={run_dir}"], 2, runs / f"{variant}.log")
    got = _metrics(run_dir)
    assert sorted(got) == [1, 2, 3]
    _assert_metrics_close(got, _metrics(reference), range(1, 4), f"{variant} vs none")
    _assert_weights_close(run_dir, reference, 3, f"{variant} vs none")


@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("deepspeed-zero2", marks=deepspeed_missing)])
def test_kill_and_resume_is_exact(base: list[str], runs: Path, fsdp2_run: Path, engine: str):
    """SIGKILL a 2-rank run after its step-2 checkpoint, rerun it: steps 1-4 == uninterrupted."""
    overrides = FSDP2 if engine == "fsdp2" else ENGINE_VARIANTS[engine]
    if engine == "fsdp2":
        uninterrupted = fsdp2_run
    else:
        uninterrupted = runs / f"{engine}-uninterrupted"
        _run([*base, *overrides, f"run.output_dir={uninterrupted}"], 2, runs / f"{engine}-full.log")
    run_dir, log = runs / f"killed-{engine}", runs / f"killed-{engine}-first.log"
    command = [*base, *overrides, f"run.output_dir={run_dir}"]
    process = _launch(command, 2, log)
    step2, deadline = run_dir / "checkpoints" / "step_000002", time.monotonic() + TIMEOUT_S
    try:
        while not step2.is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        finished = process.poll()
        _kill_tree(process)
    assert finished is None, f"the run ended (exit {finished}) before step 2 was saved:\n{_output(log)}"
    assert step2.is_dir(), f"no step-2 checkpoint after {TIMEOUT_S} s:\n{_output(log)}"
    saved = [path.name for path in complete_checkpoints(run_dir)]
    partial = sorted(path.name for path in (run_dir / "checkpoints").glob(".partial_*"))
    logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    print(f"killed with checkpoints {saved}, partial {partial}, metrics of steps {logged}")
    assert saved[-1] == "step_000002", (
        f"killed too late (checkpoints {saved}): raise sampler.num_steps in COMMON to slow steps down")

    _, output = _run(command, 2, runs / f"killed-{engine}-resumed.log")
    assert re.search(r"resumed from \S*step_000002 at step 2", output), output[-8000:]
    got, want = _metrics(run_dir), _metrics(uninterrupted)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # same world size, same reduction order: bitwise the same numbers
        assert _deterministic(got[step]) == _deterministic(want[step]), f"step {step}"
    for ema in (False, True):
        a, b = _weights(run_dir, 4, ema), _weights(uninterrupted, 4, ema)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), f"final weights differ (ema={ema})"


def _seed_run(source: Path, target: Path, step: int) -> None:
    """A run folder holding `source`'s step-`step` checkpoint and its full metrics.jsonl (the resumed
    run must drop the later lines itself)."""
    name = f"step_{step:06d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    shutil.copy(source / "metrics.jsonl", target / "metrics.jsonl")


def test_resharding_2_ranks_to_1(base: list[str], runs: Path, reference: Path, fsdp2_run: Path):
    """A 2-rank fsdp2 step-2 checkpoint resumes in 1 process (engine none): step 3 == reference's."""
    run_dir = runs / "reshard_2_to_1"
    _seed_run(fsdp2_run, run_dir, 2)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_000002").glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]
    _, output = _run([*base, "train.steps=3", f"run.output_dir={run_dir}"], 1, runs / "reshard_2_to_1.log")
    assert re.search(r"resumed from \S*step_000002 at step 2", output), output[-8000:]
    got = _metrics(run_dir)
    assert sorted(got) == [1, 2, 3]
    _assert_metrics_close(got, _metrics(reference), [3], "2 ranks -> 1")
    _assert_weights_close(run_dir, reference, 3, "2 ranks -> 1")


def test_resharding_1_rank_to_2(base: list[str], runs: Path, reference: Path):
    """A 1-process (engine none) step-2 checkpoint resumes on 2 ranks (fsdp2): step 3 == reference's."""
    run_dir = runs / "reshard_1_to_2"
    _seed_run(reference, run_dir, 2)
    _, output = _run([*base, *FSDP2, "train.steps=3", f"run.output_dir={run_dir}"], 2,
                     runs / "reshard_1_to_2.log")
    assert re.search(r"resumed from \S*step_000002 at step 2", output), output[-8000:]
    got = _metrics(run_dir)
    assert sorted(got) == [1, 2, 3]
    _assert_metrics_close(got, _metrics(reference), [3], "1 rank -> 2")
    _assert_weights_close(run_dir, reference, 3, "1 rank -> 2")


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.engine=none"], r"ddrl: error: parallel\.engine=none .*fsdp2"),
    ([*FSDP2, "algo.prompts_per_step=3"], r"ddrl: error: algo\.prompts_per_step=3 .*2 data-parallel"),
], ids=["engine_none", "prompts_per_step"])
def test_bad_launch_fails_naming_the_key(base: list[str], runs: Path, overrides: list[str],
                                         message: str):
    """Under torchrun with 2 ranks: engine none, or prompts not divisible by ranks, fail naming the key."""
    run_dir = runs / f"bad_{overrides[-1].replace('=', '_')}"
    status, output = _run([*base, *overrides, f"run.output_dir={run_dir}"], 2,
                          runs / f"{run_dir.name}.log", expect_ok=False)
    assert status != 0, output[-8000:]
    assert re.search(message, output), output[-8000:]
    assert not (run_dir / "metrics.jsonl").exists()


def test_collective_timeout_names_rank_and_operation(tmp_path: Path):
    """A barrier that rank 1 never enters times out on rank 0 with an error naming rank 0 and barrier."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    timeout_s, processes, logs = 3.0, [], []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        logs.append(tmp_path / f"rank{rank}.log")
        with logs[-1].open("w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, str(SCRIPTS / "barrier_timeout.py"), str(timeout_s)], cwd=REPO,
                env=env, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True))
    try:
        status = processes[0].wait(timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    stderr = logs[0].read_text()
    assert status == 3, f"rank 0 exit {status}\nrank 0:\n{stderr}\nrank 1:\n{logs[1].read_text()}"
    assert "rank 0" in stderr and "'barrier'" in stderr, stderr
    assert "timed out" in stderr.lower(), stderr
    elapsed = float(re.search(r"elapsed ([\d.]+) s", stderr).group(1))
    assert timeout_s - 0.5 <= elapsed < timeout_s + 30, stderr
    print(f"barrier timeout after {elapsed:.2f} s (timeout_s={timeout_s})")


@pytest.mark.parametrize("variant", [
    "fsdp2", pytest.param("deepspeed-zero3", marks=deepspeed_missing),
    pytest.param("megatron-tp2", marks=megatron_missing)])
def test_pretrain_on_engines_matches_single_process(base: list[str], runs: Path, variant: str):
    """`ddrl pretrain` on 2 ranks == one process: the EMA weights each engine streams out through
    full_weights (FSDP2 gathers, ZeRO-3 partitions, TP shards) and saves (fp32 tolerance)."""
    outputs = {}
    engine_overrides = FSDP2 if variant == "fsdp2" else ENGINE_VARIANTS[variant]
    for name, nproc, engine in (("pretrain-none", 1, []), (f"pretrain-{variant}", 2, engine_overrides)):
        out = runs / name / "base.safetensors"
        if out.is_file():  # the single-process reference is shared by the variants
            outputs[name] = load_file(str(out))
            continue
        command = [sys.executable, "-m", "ddrl_scale.cli", "pretrain", *base, *engine,
                   "pretrain.steps=3", "pretrain.batch_size=4", f"pretrain.output={out}"]
        if nproc > 1:
            command[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                            f"--nproc_per_node={nproc}", "-m", "ddrl_scale.cli"]
        done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        outputs[name] = load_file(str(out))
    torch.testing.assert_close(outputs[f"pretrain-{variant}"], outputs["pretrain-none"],
                               rtol=W_RTOL, atol=W_ATOL)
