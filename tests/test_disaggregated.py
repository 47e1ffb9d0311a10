"""Disaggregated rollouts: trainer ranks + rollout ranks of one torchrun job (CPU, gloo).

Every run is a real `python -m ddrl_scale.cli demo ...` under torchrun on the tiny config of
conftest.py, compared with colocated runs of the same seed. With rollout.max_policy_lag=0 the
rollout ranks sample the very samples colocated trainers would (noise keyed by global sample
index), but in batches of another shape; the per-step losses must match within REL / ABS
(measured: equal to the last bit on this machine). With max_policy_lag=1 the pipeline overlaps and
the recorded lag must never exceed 1. Weights are checked after every publish by checksum.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import _TINY
from test_distributed import (
    LOSS_KEYS,
    _assert_metrics_close,
    _kill_tree,
    _launch,
    _metrics,
    _output,
    _run,
)

from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.parallel.roles import init_roles
from ddrl_scale.rollout.publish import weights_checksum
from ddrl_scale.rollout.transport import pack, unpack
from ddrl_scale.train.anchor_data import demo_shards
from ddrl_scale.train.checkpoint import complete_checkpoints, read_weights

COMMON = ["sampler.num_steps=4", "train.eval_prompts=0", "train.steps=4", "train.save_every=2",
          "train.resume=auto", "algo.prompts_per_step=2", "rollout.verify_publish=true",
          "rollout.timeout_s=60"]
DISAGGREGATED = ["rollout.mode=disaggregated"]


@pytest.fixture(scope="module")
def base(shared_shards_dir: Path) -> list[str]:
    overrides = [*_TINY, *COMMON, f"data.generated_dir={shared_shards_dir}"]
    demo_shards(load_config(None, overrides))  # written once, before ranks could race for them
    return overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disaggregated")


def _train(base: list[str], runs: Path, name: str, nproc: int, *overrides: str) -> Path:
    run_dir = runs / name
    _run([*base, *overrides, f"run.output_dir={run_dir}"], nproc, runs / f"{name}.log")
    return run_dir


def _check_publishes(run_dir: Path, max_lag: int) -> list[int]:
    """Every step's rollouts came from checksum-verified weights within the lag; returns the lags."""
    records = _metrics(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    lags = []
    for step, record in records.items():
        assert record["publish_checksum_ok"] == 1.0, f"step {step}"
        assert 0 <= record["policy_lag"] <= max_lag, f"step {step}: lag {record['policy_lag']}"
        assert record["policy_version"] == step - 1 - record["policy_lag"], f"step {step}"
        lags.append(int(record["policy_lag"]))
    return lags


def test_two_trainers_one_rollout_rank_match_colocated_fsdp2(base: list[str], runs: Path):
    colocated = _train(base, runs, "colocated-fsdp2", 2, "parallel.engine=fsdp2")
    remote = _train(base, runs, "2t1r", 3, "parallel.engine=fsdp2", *DISAGGREGATED)
    _assert_metrics_close(_metrics(remote), _metrics(colocated), (1, 2, 3, 4),
                          "2 trainers + 1 rollout rank vs colocated fsdp2")
    assert _check_publishes(remote, 0) == [0, 0, 0, 0]
    status = json.loads((remote / "rollout" / "worker0.json").read_text())
    assert status["state"] == "stopped" and status["version"] == 4, status
    # the trainers' checkpoints are those of a colocated run: same weights after 4 steps
    torch.testing.assert_close(read_weights(remote / "checkpoints" / "step_000004"),
                               read_weights(colocated / "checkpoints" / "step_000004"),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single(base: list[str], runs: Path) -> Path:
    return _train(base, runs, "single", 1)


def test_one_trainer_two_rollout_ranks_match_single_process(base: list[str], runs: Path, single: Path):
    remote = _train(base, runs, "1t2r", 3, *DISAGGREGATED, "rollout.num_ranks=2")
    _assert_metrics_close(_metrics(remote), _metrics(single), (1, 2, 3, 4),
                          "1 trainer + 2 rollout ranks vs one process")
    assert _check_publishes(remote, 0) == [0, 0, 0, 0]
    for worker in (0, 1):
        assert json.loads((remote / "rollout" / f"worker{worker}.json").read_text())["state"] == "stopped"


def test_tensor_parallel_rollout_copy_matches_single_process(base: list[str], runs: Path, single: Path):
    """Two rollout ranks holding one tensor-parallel copy (rollout.tp_size=2) sample what one process
    samples: the row-parallel sums change only the order of float additions (REL / ABS), the
    checksum of the gathered shards equals the trainers' full weights after every publish, and only
    the copy's first rank sends trajectories."""
    remote = _train(base, runs, "1t2r-tp2", 3, *DISAGGREGATED, "rollout.num_ranks=2", "rollout.tp_size=2")
    _assert_metrics_close(_metrics(remote), _metrics(single), (1, 2, 3, 4),
                          "1 trainer + a 2-rank tensor-parallel rollout copy vs one process")
    assert _check_publishes(remote, 0) == [0, 0, 0, 0]
    whole = sum(tensor.numel() for tensor in read_weights(remote / "checkpoints" / "step_000004").values())
    for worker in (0, 1):
        status = json.loads((remote / "rollout" / f"worker{worker}.json").read_text())
        assert status["state"] == "stopped" and status["version"] == 4, status
        assert status["tp_size"] == 2 and status["local_parameters"] < whole, status  # really split


def test_rollout_ranks_use_the_shards_caption_embeddings(base: list[str], runs: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """Prepared shards whose caption embeddings differ from what the run's text encoder gives (twice
    the hash encoder's): a 1 trainer + 1 rollout rank run equals one process, which conditions its
    rollouts on the shards' embeddings, only if the rollout rank gets them with its orders too. The
    policy starts from random weights with no zero-initialised layer, so the text matters at once."""
    from safetensors.torch import save_file
    from test_data_prepare import make_videos

    from ddrl_scale.data import prepare as prepare_module
    from ddrl_scale.models import dit_config_from
    from ddrl_scale.models.dit import VideoDiT
    from ddrl_scale.models.text import HashTextEncoder

    dit = dit_config_from(load_config(None, base))
    torch.manual_seed(0)
    policy = VideoDiT(dit)
    state = {name: torch.randn_like(param) * 0.3 for name, param in policy.state_dict().items()}
    save_file(state, runs / "random.safetensors", metadata={"dit_config": json.dumps(dit.to_dict())})

    class Doubled(HashTextEncoder):
        def encode(self, prompts, device="cpu"):
            return 2 * super().encode(prompts, device)

    monkeypatch.setattr(prepare_module, "_ENCODERS", {})
    monkeypatch.setattr(prepare_module, "build_text_encoder", lambda spec, device="cpu": Doubled(8, 12))
    make_videos(runs / "videos", 4)
    prepare_module.prepare(str(runs / "videos"), runs / "anchor", prepare_module.PrepareSettings(
        num_frames=4, height=8, width=8, samples_per_shard=2, text_encoder="hash:8:12"))
    data = [f"data.shards={runs / 'anchor'}", "data.buckets=[[3,4,8,8]]", "train.steps=2",
            f"model.init_checkpoint={runs / 'random.safetensors'}"]
    single = _train(base, runs, "prepared-single", 1, *data)
    remote = _train(base, runs, "prepared-1t1r", 2, *data, *DISAGGREGATED)
    _assert_metrics_close(_metrics(remote), _metrics(single), (1, 2),
                          "1 trainer + 1 rollout rank vs one process, prepared caption embeddings")
    assert all(record["rollout_precomputed_text"] == 1.0 for record in _metrics(remote).values())


@pytest.mark.parametrize("engine", [
    pytest.param(["parallel.engine=deepspeed", "parallel.zero_stage=3"], id="deepspeed-zero3",
                 marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                          reason="needs deepspeed (the deepspeed extra)")),
    pytest.param(["parallel.engine=megatron", "parallel.tp=2"], id="megatron-tp2",
                 marks=pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                          reason="needs megatron-core (the megatron extra)")),
])
def test_sharded_engines_publish_to_rollout_ranks(base: list[str], runs: Path, single: Path,
                                                  engine: list[str]):
    """ZeRO-3 and Megatron TP trainers stream full weights to a rollout rank: checksums hold and the
    losses match one process."""
    name = engine[0].split("=")[1]
    remote = _train(base, runs, f"2t1r-{name}", 3, *engine, *DISAGGREGATED)
    _assert_metrics_close(_metrics(remote), _metrics(single), (1, 2, 3, 4),
                          f"2 {name} trainers + 1 rollout rank vs one process")
    assert _check_publishes(remote, 0) == [0, 0, 0, 0]


def test_policy_lag_1_overlaps_and_never_exceeds_1(base: list[str], runs: Path):
    remote = _train(base, runs, "lag1", 3, *DISAGGREGATED, "rollout.num_ranks=2",
                    "rollout.max_policy_lag=1")
    lags = _check_publishes(remote, 1)
    # the first step's rollouts come from the starting weights; from then on sampling runs one
    # version behind, which is what lets it overlap the trainers' step
    assert lags == [0, 1, 1, 1], lags
    summary = json.loads((remote / "summary.json").read_text())
    assert summary["policy_lag_histogram"] == {"0": 1, "1": 3}
    records = _metrics(remote)
    assert all(records[step]["ratio_max_dev"] > 0 for step in (2, 3, 4))  # off-policy ratios
    for step, record in records.items():
        for key in ("rollout_idle_fraction", "trainer_idle_fraction"):
            assert 0.0 <= record[key] <= 1.0, (step, key, record[key])
        assert record["rollout_videos_per_s"] > 0 and record["time_publish"] > 0


def test_resume_of_a_disaggregated_run_is_exact(base: list[str], runs: Path):
    """Stop after 2 steps (checkpoint), go on to 4: equals the uninterrupted 4-step run."""
    uninterrupted = runs / "2t1r"
    if not (uninterrupted / "metrics.jsonl").is_file():
        uninterrupted = _train(base, runs, "2t1r", 3, "parallel.engine=fsdp2", *DISAGGREGATED)
    run_dir = runs / "resumed"
    _run([*base, "parallel.engine=fsdp2", *DISAGGREGATED, "train.steps=2",
          f"run.output_dir={run_dir}"], 3, runs / "resumed-first.log")
    _, output = _run([*base, "parallel.engine=fsdp2", *DISAGGREGATED, f"run.output_dir={run_dir}"], 3,
                     runs / "resumed-second.log")
    assert re.search(r"resumed from \S*step_000002 at step 2", output), output[-4000:]
    got, want = _metrics(run_dir), _metrics(uninterrupted)
    for step in (1, 2, 3, 4):
        assert {k: got[step][k] for k in LOSS_KEYS} == {k: want[step][k] for k in LOSS_KEYS}, step


@pytest.mark.parametrize("fault", ["hangs", "dies"])
def test_a_hung_or_dead_rollout_rank_stops_the_run_with_an_error_naming_it(base: list[str], runs: Path,
                                                                            fault: str):
    """SIGSTOP (hangs) or SIGKILL (dies) the rollout rank mid-run: the trainer ends within
    rollout.timeout_s (8 s), with an error naming job rank 1, and the checkpoints written before
    stay complete and loadable."""
    run_dir, log = runs / fault, runs / f"{fault}.log"
    # eager kernels: a first-step compile must not count against the short timeout of this test
    process = _launch([*base, *DISAGGREGATED, "rollout.timeout_s=8", "kernels.backend=torch",
                       "train.steps=400", "train.save_every=1", "train.keep_last=100",
                       f"run.output_dir={run_dir}"], 2, log)
    status_file, deadline = run_dir / "rollout" / "worker0.json", time.monotonic() + 120
    pid = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if complete_checkpoints(run_dir) and status_file.is_file():
                pid = json.loads(status_file.read_text())["pid"]
                break
            time.sleep(0.05)
        assert pid is not None, f"no checkpoint and worker status in time:\n{_output(log)}"
        os.kill(pid, signal.SIGSTOP if fault == "hangs" else signal.SIGKILL)
        stopped_at = time.monotonic()
        status = process.wait(timeout=90)
        elapsed = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            _kill_tree(process)
        if pid is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    output = _output(log, 10**6)
    assert status != 0, output[-4000:]
    # the error names the rank; a hung one is given up on after rollout.timeout_s (a dead one's
    # connection breaks at once, on a send or a receive, whichever comes first)
    assert "job rank 1" in output, output[-4000:]
    assert fault == "dies" or "rollout.timeout_s" in output, output[-4000:]
    assert elapsed < 60, f"{elapsed:.0f} s"
    print(f"trainer stopped {elapsed:.1f} s after the rollout rank {fault} (timeout 8 s)")
    saved = complete_checkpoints(run_dir)
    assert saved, output[-4000:]
    assert read_weights(saved[-1])  # the last checkpoint is whole and loads


# -- configuration and pieces (no processes) -------------------------------------------------------
@pytest.mark.parametrize(("overrides", "key"), [
    (["rollout.mode=disaggregated", "rollout.num_ranks=3", "algo.prompts_per_step=4"],
     "algo.prompts_per_step"),
    (["rollout.max_policy_lag=1"], "rollout.max_policy_lag"),
    (["rollout.mode=disaggregated", "rollout.max_policy_lag=1", "rollout.sync_every=3"],
     "rollout.sync_every"),
    (["rollout.mode=sideways"], "rollout.mode"),
    (["rollout.num_ranks=0"], "rollout.num_ranks"),
    (["rollout.mode=disaggregated", "rollout.num_ranks=3", "rollout.tp_size=2"], "rollout.tp_size"),
    (["rollout.mode=disaggregated", "rollout.num_ranks=4", "rollout.tp_size=2",
      "algo.prompts_per_step=3"], "algo.prompts_per_step"),
    (["rollout.mode=disaggregated", "rollout.num_ranks=2", "rollout.tp_size=2", "model.kind=diffusers_wan",
      "model.pretrained=/nowhere"], "rollout.tp_size"),
])
def test_bad_rollout_settings_name_the_key(overrides: list[str], key: str):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, overrides)


def test_no_trainer_rank_left_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config = load_config(None, ["rollout.mode=disaggregated", "rollout.num_ranks=2"])
    with pytest.raises(ConfigError, match="leave no trainer rank in a job of 2 ranks"):
        init_roles(config)


def _send_to_a_dead_peer(rank: int, store_file: str, out_file: str) -> None:
    import datetime

    import torch.distributed as dist

    from ddrl_scale.rollout.transport import Channel, PeerError

    store = dist.FileStore(store_file, 2)
    group = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=20))
    if rank == 1:
        group.barrier().wait()
        os._exit(0)  # dies without a word, as a killed rank does
    group.barrier().wait()
    channel, message = Channel(group, 0, timeout_s=10), "no error"
    try:
        for _ in range(2000):  # the broken connection shows on a send, or on the flush after
            channel.send(1, {"op": "generate"}, {"x": torch.zeros(4096)})
            time.sleep(0.005)
        channel.flush()
    except PeerError as error:
        message = str(error)
    Path(out_file).write_text(message)


def test_sending_to_a_dead_rank_is_an_error_naming_it(tmp_path: Path):
    """A send to a rank whose process is gone fails with PeerError naming the job rank, not gloo's
    bare connection error (the trainer's orders and the scoring thread's trajectories use it)."""
    import torch.multiprocessing as mp

    out = tmp_path / "message.txt"
    context = mp.spawn(_send_to_a_dead_peer, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(5):  # join returns as each process ends; wait for both
        assert time.monotonic() < deadline, "the sender neither finished nor failed"
    message = out.read_text()
    assert "job rank 1" in message or "receiving rank" in message, message


def test_message_packing_round_trips_every_dtype():
    tensors = {"states": torch.randn(3, 2, 5), "half": torch.randn(4).to(torch.bfloat16),
               "ids": torch.arange(7), "empty": torch.empty(0, 3), "flag": torch.tensor([True, False])}
    layout, payload = pack(tensors)
    assert payload.dtype == torch.uint8
    back = unpack(json.loads(json.dumps(layout)), payload.clone())
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_weights_checksum_ignores_order_and_sees_one_bit():
    weights = {"a": torch.randn(4, 4), "b": torch.randn(3)}
    reference = weights_checksum(weights.items())
    assert weights_checksum(reversed(list(weights.items()))) == reference
    flipped = weights["b"].clone()
    flipped.view(torch.int32)[0] ^= 1  # the lowest mantissa bit of one number
    assert weights_checksum([("a", weights["a"]), ("b", flipped)]) != reference
    assert weights_checksum([("a", weights["a"]), ("c", weights["b"])]) != reference


def test_roles_follow_ddrl_role_whatever_the_rank_order(monkeypatch: pytest.MonkeyPatch):
    """The SLURM script sets DDRL_ROLE per node; a c10d rendezvous may number that node first."""
    import torch.distributed as dist

    from ddrl_scale.parallel.roles import assign_roles

    store = dist.HashStore()
    store.set("ddrl/role/0", "rollout")  # the other ranks' choices, already on the store
    store.set("ddrl/role/1", "trainer")
    monkeypatch.setenv("DDRL_ROLE", "trainer")
    assert assign_roles(store, 2, 3, 1) == ["rollout", "trainer", "trainer"]
    with pytest.raises(ConfigError, match="2 rollout ranks configured, but 1 ranks"):
        assign_roles(store, 2, 3, 2)
    monkeypatch.setenv("DDRL_ROLE", "reward")
    with pytest.raises(ConfigError, match="DDRL_ROLE='reward'"):
        assign_roles(store, 2, 3, 1)
