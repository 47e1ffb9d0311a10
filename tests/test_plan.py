"""`ddrl plan`: parameter counts, the memory model against measured peak memory of real CPU
training steps, communication and step-time invariants, ranking and rejections, the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddrl_scale.config import load_config
from ddrl_scale.models.dit import DiTConfig, VideoDiT
from ddrl_scale.parallel.inference_tp import local_parameter_count
from ddrl_scale.telemetry.devices import DEVICES
from ddrl_scale.telemetry.memory import live_cpu_tensor_bytes, measure_cpu_peak_memory
from ddrl_scale.telemetry.plan import (
    Assumptions,
    Cluster,
    ParallelPlan,
    Workload,
    communication,
    estimate_memory,
    evaluate_plan,
    parameter_counts,
    rank_plans,
    trajectory_bytes_per_sample,
)
from ddrl_scale.telemetry.plan_cli import latent_size, main
from ddrl_scale.telemetry.plan_rollout import rollout_rank_memory, rollout_tp_candidates

ROOT = Path(__file__).resolve().parents[1]
H100 = DEVICES["h100-sxm"]

# Real CPU training steps whose measured peak the memory model must predict within 20%:
# activations dominate (a), many tokens (b), one trained step so gradients do not meet the
# activations (c), a KL reference copy and bigger groups (d).
MEASURED = {
    "a": ["model.hidden_size=96", "model.depth=2", "model.num_heads=4", "sampler.num_steps=4"],
    "b": ["model.hidden_size=48", "model.depth=2", "model.num_heads=4", "video.height=32",
          "video.width=32", "sampler.num_steps=4"],
    "c": ["model.hidden_size=192", "model.depth=2", "model.num_heads=6", "sampler.num_steps=2",
          "algo.prompts_per_step=1"],
    "d": ["model.hidden_size=128", "model.depth=3", "model.num_heads=4", "sampler.num_steps=4",
          "algo.group_size=4", "algo.prompts_per_step=1", "algo.kl_beta=0.01"],
}
BASE = ["model.init_checkpoint=none", "model.text_dim=32", "video.num_frames=8", "video.height=16",
        "video.width=16", "model.patch_size=[2,2,2]", "algo.group_size=2", "algo.prompts_per_step=2",
        "train.eval_prompts=0", "parallel.timeout_s=120"]


def _big_workload(**overrides) -> Workload:
    """A 1.3B-class video DiT, 33 frames at 480x832 through a 4x8x8 VAE, bf16."""
    items = {"model.depth": 30, "model.hidden_size": 1536, "model.num_heads": 12,
             "model.patch_size": "[1,2,2]", "model.max_text_tokens": 512, "video.channels": 16,
             "video.num_frames": 9, "video.height": 60, "video.width": 104, "run.dtype": "bf16",
             "algo.prompts_per_step": 8, "algo.group_size": 4, "sampler.num_steps": 16, **overrides}
    config = load_config(None, ["model.init_checkpoint=none",
                                *(f"{key}={value}" for key, value in items.items())])
    return Workload.from_config(config, pixel_shape=(3, 33, 480, 832))


# -- parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [{}, {"qk_norm": False, "mlp_ratio": 2.5},
                                     {"hidden_size": 48, "num_heads": 8, "depth": 3,
                                      "patch_size": (1, 2, 4), "text_dim": 20}])
def test_parameter_counts_match_the_model(changes):
    dit = DiTConfig(**changes)
    model = VideoDiT(dit)
    total, split = parameter_counts(dit)
    assert total == sum(p.numel() for p in model.parameters())
    # what megatron's TP splits (parallel/megatron_engine.py): q/k/v and the first MLP layer whole,
    # the attention outputs and second MLP layer by weight only (their bias stays whole)
    split_names = ("query.", "key.", "value.", "out.weight", "mlp.0.", "mlp.2.weight")
    assert split == sum(p.numel() for name, p in model.named_parameters()
                        if name.startswith("blocks.") and any(k in name for k in split_names))


# -- memory against measured peaks ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MEASURED))
def test_memory_prediction_within_20_percent_of_measured_peak(name, tiny_overrides):
    """One training iteration (rollout, rewards, policy + data terms, AdamW, EMA) of the single
    process engine, measured after a first iteration created the optimizer state."""
    from ddrl_scale.train.trainer import Trainer

    config = load_config(None, [*tiny_overrides, *BASE, *MEASURED[name]])
    trainer = Trainer(config)
    trainer.iteration()
    _, peak = measure_cpu_peak_memory(trainer.iteration)
    predicted = estimate_memory(Workload.from_config(config), ParallelPlan(1), on_gpu=False)
    assert _within(predicted["total"], peak.peak_bytes_lower_bound, peak.peak_bytes, 0.20), \
        (predicted, peak)
    # the model's fp32 parameters, AdamW moments and EMA (+ reference) were alive throughout;
    # the baseline also holds whatever else the process keeps (data, buffers, other tests)
    static = sum(predicted[key] for key in ("parameters", "optimizer", "ema", "reference"))
    assert static <= peak.baseline_bytes


def _within(predicted: float, low: float, high: float, tolerance: float) -> bool:
    """Is `predicted` within `tolerance` of some value the measurement allows, [low, high]?"""
    return (1 - tolerance) * low <= predicted <= (1 + tolerance) * high


def _distributed_worker(out: str, overrides: list[str]) -> None:
    """In torchrun: one measured FSDP2 iteration per rank; rank results go to out.<rank>.json."""
    import torch.distributed as dist

    from ddrl_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config(None, overrides)
    trainer = Trainer(config)
    trainer.iteration()
    _, peak = measure_cpu_peak_memory(trainer.iteration)
    world = dist.get_world_size()
    plan = ParallelPlan(world, cp=config.parallel.cp, shard=world // config.parallel.dp_replicate,
                        activation_checkpointing=config.parallel.activation_checkpointing)
    predicted = estimate_memory(Workload.from_config(config), plan, on_gpu=False)
    Path(f"{out}.{dist.get_rank()}.json").write_text(json.dumps(
        {"measured": peak.peak_bytes, "lower": peak.peak_bytes_lower_bound,
         "predicted": predicted["total"]}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["parallel.activation_checkpointing=false"],
                                      ["parallel.activation_checkpointing=true"],
                                      ["parallel.cp=2"]], ids=["fsdp", "fsdp-ac", "cp2"])
def test_memory_prediction_of_fsdp2_on_two_ranks(parallel, tiny_overrides, tmp_path):
    """FSDP2 over 2 gloo ranks (sharded, with checkpointing, with Ulysses CP): within 20% of the
    peak measured on each rank (a range when gloo's threads freed some tensors unseen)."""
    overrides = [*tiny_overrides, *BASE, *MEASURED["a"], "parallel.engine=fsdp2", *parallel]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               __file__, "--worker", str(tmp_path / "peak"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"peak.{rank}.json").read_text())
        assert _within(figures["predicted"], figures["lower"], figures["measured"], 0.20), figures


ROLLOUT_COPY = ["model.init_checkpoint=none", "model.text_dim=32", "model.max_text_tokens=12",
                "video.num_frames=8", "video.height=16", "video.width=16", "model.patch_size=[2,2,2]",
                "model.hidden_size=96", "model.depth=2", "model.num_heads=4", "sampler.num_steps=4",
                "algo.group_size=4", "algo.prompts_per_step=2"]


def _rollout_rank_peak(rank: int, size: int, store_file: str, out_dir: str) -> None:
    """One rank of a rollout copy split `size` ways (as rollout/worker.py builds it): its local
    parameters and the peak of sampling one batch, measured after a first batch."""
    import torch.distributed as dist

    from ddrl_scale.algo.schedules import sigma_schedule
    from ddrl_scale.models import build_model
    from ddrl_scale.parallel.inference_tp import shard_inference_copy
    from ddrl_scale.rollout.colocated import sample_rollouts

    torch.set_num_threads(1)
    config = load_config(None, ROLLOUT_COPY)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    model = build_model(config).eval().requires_grad_(False)
    if size > 1:
        shard_inference_copy(model, dist.device_mesh.init_device_mesh("cpu", (size,)))
    video, algo = config.video, config.algo
    shape = (video.channels, video.num_frames, video.height, video.width)
    prompts = [f"prompt {index}" for index in range(algo.prompts_per_step)]
    text = torch.randn(len(prompts) * algo.group_size, config.model.max_text_tokens, config.model.text_dim,
                       generator=torch.Generator().manual_seed(0))
    sigmas = sigma_schedule(config.sampler.num_steps, config.sampler.shift)

    def sample():
        return sample_rollouts(lambda x, sigma, context: model(x, sigma, context), lambda _: text, prompts,
                               shape, sigmas, config.sampler, algo, 0, 1, 0, torch.device("cpu"))

    sample()
    _, peak = measure_cpu_peak_memory(sample)
    local = local_parameter_count(model)
    Path(out_dir, f"rollout{rank}.json").write_text(json.dumps(
        {"local_parameters": local, "increase": peak.peak_increase_bytes,
         "lower": peak.peak_increase_bytes - peak.unseen_free_bytes}))
    if size > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: two processes
def test_rollout_rank_memory_matches_a_measured_copy(tp, tmp_path):
    """A rollout copy whole and split over 2 gloo ranks: its local parameters exactly, the peak of
    sampling (trajectory + forward temporaries) within 10% (measured within 2%)."""
    if tp == 1:
        _rollout_rank_peak(0, 1, "", str(tmp_path))
    else:
        mp.spawn(_rollout_rank_peak, args=(tp, str(tmp_path / "store"), str(tmp_path)), nprocs=tp,
                 join=True)
    workload = Workload.from_config(load_config(None, ROLLOUT_COPY))
    predicted = rollout_rank_memory(workload, ParallelPlan(1, rollout_ranks=tp, rollout_tp=tp))
    # the video is decoded after sampling, on the scoring thread: not part of this measurement
    sampling = predicted["activations"] + predicted["trajectory"] - workload.samples * 4 * (
        workload.pixel_elements)
    assert predicted["trajectory"] == workload.samples * trajectory_bytes_per_sample(workload)
    for rank in range(tp):
        figures = json.loads((tmp_path / f"rollout{rank}.json").read_text())
        assert predicted["parameters"] == 4 * figures["local_parameters"]  # an fp32 run's copy
        assert _within(sampling, figures["lower"], figures["increase"], 0.10), (sampling, figures)


def test_measure_cpu_peak_memory_counts_known_allocations():
    kept = torch.ones(1_000_000)  # 4 MB alive before and after: baseline

    def work():
        first = torch.empty(2_000_000)  # 8 MB
        second = torch.empty(3_000_000)  # 12 MB while the first is alive: peak 20 MB
        del first, second
        return torch.empty(500_000)  # 2 MB kept

    result, peak = measure_cpu_peak_memory(work)
    assert peak.baseline_bytes >= kept.numel() * 4
    assert 20e6 <= peak.peak_increase_bytes < 20e6 + 1e6
    assert peak.end_increase_bytes == result.numel() * 4
    assert peak.unseen_free_bytes == 0 and peak.peak_bytes_lower_bound == peak.peak_bytes
    assert live_cpu_tensor_bytes() >= peak.baseline_bytes + result.numel() * 4 - 1e6


# -- the memory model's structure -----------------------------------------------------------------
def test_sharding_checkpointing_and_tp_reduce_what_they_should():
    workload = _big_workload()
    plain = estimate_memory(workload, ParallelPlan(8, shard=1))
    fsdp = estimate_memory(workload, ParallelPlan(8, shard=8))
    assert fsdp["parameters"] == pytest.approx(plain["parameters"] / 8)
    assert fsdp["optimizer"] == pytest.approx(2 * fsdp["parameters"])  # two fp32 AdamW moments
    assert fsdp["fsdp_gathered"] > 0 == plain["fsdp_gathered"]
    checkpointed = estimate_memory(workload, ParallelPlan(8, shard=8, activation_checkpointing=True))
    assert checkpointed["activations"] < fsdp["activations"] / 4
    tp = estimate_memory(workload, ParallelPlan(8, tp=2))
    params, split = parameter_counts(workload.dit)
    assert tp["parameters"] == pytest.approx(4 * (params - split / 2))
    cp = estimate_memory(workload, ParallelPlan(8, cp=2, shard=8))
    # CP halves the tokens but also the data-parallel ranks: same samples x tokens per rank
    assert cp["activations"] == pytest.approx(fsdp["activations"], rel=0.1)
    reference = estimate_memory(_big_workload(**{"algo.kl_beta": 0.01}), ParallelPlan(8, shard=8))
    assert reference["reference"] == pytest.approx(4 * params)  # an unsharded fp32 copy


def test_communication_by_hand_for_ddp_and_fsdp():
    workload = _big_workload()
    params = parameter_counts(workload.dit)[0]
    cluster = Cluster(H100, 8, 1)
    # 8 trained steps each with a data-term forward: 16 forwards with grad, 16 rollout forwards
    ddp = communication(workload, ParallelPlan(8, shard=1), cluster)
    assert set(ddp) == {"replicate"}
    assert ddp["replicate"]["bytes"] == pytest.approx(16 * 2 * 7 / 8 * params * 4)
    fsdp = communication(workload, ParallelPlan(8, shard=8), cluster)
    assert set(fsdp) == {"fsdp"} and fsdp["fsdp"]["link"] == "intra"
    gathers, scatters = 2 * 16 + 16, 16
    assert fsdp["fsdp"]["bytes"] == pytest.approx(7 / 8 * params * (2 * gathers + 4 * scatters))
    two_nodes = communication(workload, ParallelPlan(16, shard=16), Cluster(H100, 8, 2))
    assert two_nodes["fsdp"]["link"] == "inter"
    hsdp = communication(workload, ParallelPlan(16, shard=8), Cluster(H100, 8, 2))
    assert hsdp["fsdp"]["link"] == "intra" and hsdp["replicate"]["link"] == "inter"


def test_step_time_mfu_is_the_assumed_efficiency_when_compute_bound():
    workload = _big_workload()
    cluster = Cluster(H100, 8, 1)
    result = evaluate_plan(workload, ParallelPlan(8, shard=8, activation_checkpointing=True), cluster,
                           Assumptions(compute_efficiency=0.5))
    assert result.times["comm_exposed_s"] == 0.0  # FSDP traffic hides under compute on NVLink
    flops = workload.flops
    compute = ((flops["policy"] + flops["data"]) * 4 / 3 + flops["rollout"]) / 8 / (989.4e12 * 0.5)
    assert result.times["step_s"] == pytest.approx(compute)
    # checkpointing recomputes a forward: MFU = 0.5 x model FLOPs / FLOPs done
    done = (flops["policy"] + flops["data"]) * 4 / 3 + flops["rollout"]
    assert result.times["mfu"] == pytest.approx(0.5 * sum(flops.values()) / done)
    slow_links = Cluster(DEVICES["h100-sxm"].__class__(**{**H100.__dict__, "intra_node_gb_s": 0.5}),
                         8, 1)
    slower = evaluate_plan(workload, ParallelPlan(8, shard=8, activation_checkpointing=True),
                           slow_links, Assumptions(compute_efficiency=0.5))
    assert slower.times["comm_exposed_s"] > 0 and slower.times["step_s"] > result.times["step_s"]


def test_separate_rollout_ranks_hold_a_copy_publish_weights_and_overlap_with_lag():
    workload = _big_workload()
    cluster = Cluster(H100, 8, 1)
    plan = ParallelPlan(4, shard=2, activation_checkpointing=True, rollout_ranks=4)
    synchronous = evaluate_plan(workload, plan, cluster, Assumptions(policy_lag=0))
    overlapped = evaluate_plan(workload, plan, cluster, Assumptions(policy_lag=1))
    assert synchronous.feasible and overlapped.feasible
    params = parameter_counts(workload.dit)[0]
    assert synchronous.memory["rollout_rank_total"] > 2 * params  # a whole bf16 copy and more
    assert synchronous.comm["publish"]["bytes"] >= 2 * params
    assert "fsdp" in synchronous.comm  # trainers gather only for their own passes
    times = synchronous.times
    assert times["step_s"] > times["rollout_compute_s"] + times["compute_s"]  # turns + publishing
    assert overlapped.times["step_s"] == pytest.approx(
        max(times["rollout_compute_s"], times["step_s"] - times["rollout_compute_s"]))
    assert overlapped.times["mfu"] > times["mfu"]


# -- tensor-parallel rollout copies ---------------------------------------------------------------
def test_rollout_tp_splits_a_rollout_ranks_projections_and_their_temporaries():
    workload = _big_workload()
    params, split = parameter_counts(workload.dit)
    dit = workload.dit
    # the same 4 copies, whole or split over 2 and 4 ranks: the same samples per rank
    by_tp = {tp: rollout_rank_memory(workload, ParallelPlan(8, rollout_ranks=4 * tp, rollout_tp=tp))
             for tp in (1, 2, 4)}
    for tp, memory in by_tp.items():
        assert memory["parameters"] == pytest.approx(2 * (params - split + split / tp))  # bf16 copy
        assert memory["trajectory"] == by_tp[1]["trajectory"]  # every rank of a copy holds its samples
    # the split projections are most of a DiT: the copy shrinks by their share, not by tp
    assert by_tp[1]["parameters"] - by_tp[2]["parameters"] == pytest.approx(2 * split / 2)
    assert by_tp[4]["parameters"] > 2 * (params - split)
    # the MLP stage's hidden activation is what splits: per sample, tokens x MLP width x (2 - 2 / tp)
    samples = workload.samples / 4
    saved = samples * dit.num_tokens * 2 * dit.mlp_hidden * (1 - 1 / 2) * 2
    assert by_tp[1]["activations"] - by_tp[2]["activations"] == pytest.approx(saved)
    assert by_tp[1]["total"] > by_tp[2]["total"] > by_tp[4]["total"]
    # with the rollout ranks fixed, TP means fewer copies: each rank's trajectories grow
    fixed = rollout_rank_memory(workload, ParallelPlan(8, rollout_ranks=4, rollout_tp=2))
    assert fixed["trajectory"] == pytest.approx(2 * by_tp[1]["trajectory"])
    assert fixed["parameters"] == by_tp[2]["parameters"]
    # the plan's memory carries the rollout rank's parts
    plan_memory = estimate_memory(workload, ParallelPlan(8, shard=8, rollout_ranks=8, rollout_tp=2))
    assert plan_memory["rollout_rank_total"] == pytest.approx(by_tp[2]["total"])


def test_rollout_tp_all_reduces_on_the_rollout_side_of_the_step():
    workload = _big_workload()
    cluster = Cluster(H100, 8, 2)
    plan = ParallelPlan(8, shard=8, activation_checkpointing=True, rollout_ranks=8)
    whole = evaluate_plan(workload, plan, cluster)
    split = evaluate_plan(workload, replace(plan, rollout_tp=2), cluster)
    assert whole.feasible and split.feasible and "rollout_tp" not in whole.comm
    # 8 ranks compute their 1/8 of the sampling FLOPs either way; the split copies also all-reduce
    assert split.times["rollout_compute_s"] == pytest.approx(whole.times["rollout_compute_s"])
    dit = workload.dit
    copy_samples = workload.samples / 4
    volume = (workload.sampler_steps * copy_samples * dit.depth * 3 * dit.num_tokens * dit.hidden_size
              * 2 * 2 * (1 / 2))  # 3 bf16 all-reduces per block and forward, ring of 2
    entry = split.comm["rollout_tp"]
    assert entry["bytes"] == pytest.approx(volume) and entry["link"] == "intra"
    seconds = volume / (entry["gb_s"] * 1e9 * Assumptions().comm_efficiency)
    assert split.times["rollout_s"] == pytest.approx(split.times["rollout_compute_s"] + seconds)
    assert split.times["step_s"] == pytest.approx(whole.times["step_s"] + seconds)  # lag 0: in turn
    # trainers 0..5 leave rollout copy 0 (ranks 6..9) straddling two nodes
    straddling = communication(workload, ParallelPlan(6, shard=6, rollout_ranks=8, rollout_tp=4), cluster)
    assert straddling["rollout_tp"]["link"] == "inter"


def test_infeasible_rollout_tp_is_rejected_with_the_reason():
    workload = _big_workload()  # 12 heads, MLP width 6144, 8 prompts
    cluster = Cluster(H100, 8, 4)

    def reasons(**plan) -> str:
        trainers = ParallelPlan(8, shard=8, activation_checkpointing=True, **plan)
        return "; ".join(evaluate_plan(workload, trainers, cluster).reasons)

    assert "rollout TP=8 must divide num_heads=12 and the MLP width 6144" in reasons(rollout_ranks=8,
                                                                                    rollout_tp=8)
    assert "rollout TP=4 must divide the 6 rollout ranks" in reasons(rollout_ranks=6, rollout_tp=4)
    assert ("algo.prompts_per_step=8 is not a multiple of the 16 rollout copies (16 rollout ranks / "
            "rollout TP 1" in reasons(rollout_ranks=16))
    assert reasons(rollout_ranks=16, rollout_tp=2) == ""  # 8 copies of 2 ranks: one prompt each
    assert "needs separate rollout ranks" in reasons(rollout_tp=2)
    small = Cluster(H100.__class__(**{**H100.__dict__, "memory_gb": 3.0}), 8, 4)
    too_big = evaluate_plan(workload, ParallelPlan(8, shard=8, activation_checkpointing=True,
                                                   rollout_ranks=4), small)
    assert any(r.startswith("needs ") and "per rollout GPU" in r for r in too_big.reasons)


def test_rank_plans_adds_the_smallest_rollout_tp_that_runs():
    workload = _big_workload()
    cluster = Cluster(H100, 8, 3)
    # 16 rollout ranks, 8 prompts: whole copies would be 16, so TP2 (8 copies) is added
    assert rollout_tp_candidates(workload, cluster, 16) == (1, 2)
    assert rollout_tp_candidates(workload, cluster, 8) == (1,)  # whole copies run: nothing added
    assert rollout_tp_candidates(workload, cluster, 0, (2,)) == (1,)  # colocated: no rollout copies
    feasible, rejected = rank_plans(workload, cluster, rollout_ranks=(16,))
    assert feasible and {r.plan.rollout_tp for r in feasible} == {2}
    assert feasible[0].plan.describe().endswith("+16 rollout (TP2)")
    assert any("not a multiple of the 16 rollout copies" in " ".join(r.reasons) for r in rejected)
    # a device on which a whole bf16 copy (2.6 GB) and its samples do not fit, but half of one does
    # (small groups: with the rollout ranks fixed, TP2 doubles a rank's samples and their videos)
    workload = _big_workload(**{"algo.group_size": 2})
    whole = rollout_rank_memory(workload, ParallelPlan(8, rollout_ranks=8))["total"]
    half = rollout_rank_memory(workload, ParallelPlan(8, rollout_ranks=8, rollout_tp=2))["total"]
    memory_gb = (whole + half) / 2 / 0.9 / 1e9
    small = Cluster(H100.__class__(**{**H100.__dict__, "memory_gb": memory_gb}), 8, 2)
    assert rollout_tp_candidates(workload, small, 8) == (1, 2)
    assert rollout_tp_candidates(workload, small, 8, (2,)) == (2,)


# -- ranking and rejection ------------------------------------------------------------------------
def test_rank_plans_sorts_feasible_ones_and_names_why_others_fail():
    workload = _big_workload()
    feasible, rejected = rank_plans(workload, Cluster(H100, 8, 1), rollout_ranks=(0, 2))
    assert feasible, "a 1.3B DiT fits on 8 H100s"
    times = [result.times["step_s"] for result in feasible]
    assert times == sorted(times)
    usable = 0.9 * 80e9
    assert all(result.memory["total"] <= usable for result in feasible)
    reasons = {result.plan.describe(): result.reasons for result in rejected}
    assert any("TP=8 must divide num_heads=12" in r for r in reasons["TP8 x DP1"])
    assert any("CP=8 must divide num_heads=12" in r for r in reasons["CP8 FSDP8"])
    assert any("no engine has both" in r for r in reasons["TP2 x DP2"])  # TP2 x CP2
    assert any("must be a multiple of the 3 data-parallel ranks" in r
               for r in reasons["CP2 FSDP6 +2 rollout"])
    assert any(r.startswith("needs ") and "GB per training GPU" in r for r in reasons["DDP8"])


def test_a_too_small_device_leaves_no_feasible_plan():
    small = Cluster(H100.__class__(**{**H100.__dict__, "memory_gb": 1.0}), 8, 1)
    feasible, rejected = rank_plans(_big_workload(), small)
    assert not feasible and any("GB usable" in " ".join(r.reasons) for r in rejected)


def test_latent_size_of_causal_and_plain_vaes():
    assert latent_size(81, 4, "--frames", causal=True) == 21  # Wan 2.1: 1 + 4 * 20
    assert latent_size(80, 4, "--frames", causal=True) == 20
    assert latent_size(480, 8, "--height") == 60
    with pytest.raises(ValueError, match="--height=481: expected a multiple of the VAE compression 8"):
        latent_size(481, 8, "--height")


# -- the command ----------------------------------------------------------------------------------
FLAGS = ["--layers", "30", "--hidden-size", "1536", "--heads", "12", "--frames", "33", "--height",
         "480", "--width", "832", "--vae-compression", "4,8,8", "--latent-channels", "16", "--patch",
         "1,2,2", "--text-tokens", "512", "--prompts", "8", "--group-size", "4", "--sampler-steps",
         "16", "--dtype", "bf16", "--gpu", "h100", "--gpus-per-node", "8"]


def test_plan_command_prints_a_ranked_table_with_assumptions(capsys):
    assert main(FLAGS) == 0
    out = capsys.readouterr().out
    assert "16x9x60x104 -> 14040 tokens" in out
    assert "  1  FSDP8 +AC" in out
    assert "rejected:" in out and "assumptions:" in out and "compute at 50% of peak" in out
    assert "#1 memory per GPU (GB): parameters" in out


def test_plan_command_json_matches_the_library(capsys):
    assert main([*FLAGS, "--json", "--rollout-ranks", "0", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    feasible, rejected = rank_plans(_big_workload(), Cluster(H100, 8, 1), rollout_ranks=(0, 2))
    assert [plan["plan"] for plan in report["plans"]] == [r.plan.describe() for r in feasible]
    assert len(report["rejected"]) == len(rejected)
    assert report["plans"][0]["step_s"] == pytest.approx(feasible[0].times["step_s"])
    assert report["assumptions"] and report["workload"]["tokens"] == 14040


def test_plan_command_reads_a_config_and_its_launch_section(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  hidden_size: 64\n  num_heads: 4\nlaunch:\n  nodes: 2\n"
                      "  nproc_per_node: 4\n")
    assert main(["--config", str(config), "model.depth=3", "--gpu", "a100"]) == 0
    out = capsys.readouterr().out
    assert "model: 3 layers x 64 wide" in out and "2 node(s) x 4 a100" in out


def test_plan_command_reads_the_rollout_ranks_and_rollout_tp_of_a_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  hidden_size: 64\n  num_heads: 4\nrollout:\n  mode: disaggregated\n"
                      "  num_ranks: 2\n  tp_size: 2\nlaunch:\n  nproc_per_node: 4\n")
    assert main(["--config", str(config), "--gpu", "a100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plans = report["plans"] + report["rejected"]
    assert report["plans"] and {(p["rollout_ranks"], p["rollout_tp"]) for p in plans} == {(2, 2)}
    assert report["plans"][0]["plan"].endswith("+2 rollout (TP2)")
    assert any("rollout TP k (rollout.tp_size)" in line for line in report["assumptions"])


def test_plan_command_rollout_tp_flag(capsys):
    assert main([*FLAGS, "--nodes", "2", "--rollout-ranks", "8", "--rollout-tp", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert "+8 rollout (TP2)" in out and "+8 rollout (TP4)" in out and "+8 rollout  " not in out
    assert "#1 memory per rollout GPU (GB, rollout TP 2): parameters" in out
    assert "rollout_tp" in out  # the copy's all-reduces in the #1 plan's traffic
    assert main([*FLAGS, "--rollout-ranks", "2", "--rollout-tp", "0"]) == 2
    assert "--rollout-tp: expected values >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--frames", "30", "--vae-compression", "4,8,8"], "--frames=30: expected a multiple"),
    (["--gpu", "v100"], "unknown GPU type 'v100'"),
    (["--efficiency", "1.5"], "--efficiency: expected a fraction"),
    (["model.depth=x"], "model.depth"),
])
def test_plan_command_names_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_command_on_this_cpu_measures_its_peak(capsys):
    assert main(["--gpu", "cpu", "--gpus-per-node", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "x 2 cpu" in out and "gloo over loopback (assumed)" in out


if __name__ == "__main__" and "--worker" in sys.argv:
    _distributed_worker(sys.argv[sys.argv.index("--worker") + 1],
                        sys.argv[sys.argv.index("--worker") + 2:])


# -- what would fit (issue 24 item 8) --------------------------------------------------------------------
WAN14B = ["--config", str(ROOT / "configs" / "wan2.1_t2v_14b_16node.yaml"), "--gpu", "h100"]


def _fastest(overrides: list[str], cluster: Cluster):
    """The fastest feasible plan of the Wan 14B recipe (its latent shape) with `overrides`, or None."""
    config = load_config(str(ROOT / "configs" / "wan2.1_t2v_14b_16node.yaml"), overrides)
    feasible, _ = rank_plans(Workload.from_config(config), cluster)
    return feasible[0] if feasible else None


def test_infeasible_question_prints_the_smallest_change_of_each_knob(capsys):
    """Wan2.1-14B on 8 x 8 H100: no plan; the report names, per knob, the nearest value that fits
    (fewer prompts: CP2 splits a prompt group over two GPUs; more nodes) with its memory, or the
    knob's far end and the memory it still needs (group size 2, the largest GPU)."""
    assert main([*WAN14B, "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "no feasible plan" in out and "  what would fit" in out
    eight_nodes = Cluster(H100, 8, 8)
    assert _fastest(["algo.prompts_per_step=64"], eight_nodes) is None  # the nearer value does not fit
    fits = _fastest(["algo.prompts_per_step=32"], eight_nodes)
    assert fits.plan.cp == 2
    memory = max(fits.memory["total"], fits.memory.get("rollout_rank_total", 0)) / 1e9
    assert (f"alone:    --prompts 32 (algo.prompts_per_step=32): {fits.plan.describe()}, parallel.cp=2, "
            f"{memory:.1f} GB per GPU") in out
    assert _fastest(["algo.group_size=2"], eight_nodes) is None
    assert "alone:    --group-size 2 (algo.group_size=2): not enough alone: " in out
    assert "alone:    --gpu b200: not enough alone: " in out  # h200 (141 GB) and b200 (180 GB) both short
    assert _fastest([], Cluster(DEVICES["b200"], 8, 8)) is None
    assert "    alone:    --nodes " in out and "LoRA" in out
    assert main([*WAN14B, "--nodes", "8", "--json"]) == 0
    changes = json.loads(capsys.readouterr().out)["changes"]
    prompts = next(change for change in changes if change["flags"] == "--prompts 32")
    assert prompts["fits"] and prompts["cp"] == 2 and prompts["step_s"] > 0


def test_changes_of_two_knobs_when_no_knob_alone_fits():
    """One GPU per node and one head (no CP): with a memory between what group size 2 with one
    prompt needs and the least any knob alone reaches, no knob alone fits and that pair does."""
    from ddrl_scale.telemetry.plan import Assumptions
    from ddrl_scale.telemetry.plan_changes import Question, describe_changes, knobs, smallest_changes

    config = load_config(None, [*BASE, "model.num_heads=1", "algo.prompts_per_step=4", "algo.group_size=4",
                                "video.height=64", "video.width=64"])  # activations dominate

    def question(memory_gb: float) -> Question:
        # a device named cpu: no larger GPU class to suggest (any real GPU dwarfs these sizes)
        device = replace(H100, name="cpu", memory_gb=memory_gb)
        return Question(config, None, Cluster(device, 1, 1), Assumptions(), (0,), (1,))

    # with no memory at all, each verdict carries the plan of least memory
    probe = question(1e-6)
    by_flag = {knob.flag: knob for knob in knobs(config, probe.cluster)}
    pair = probe.ask(((by_flag["--group-size"], 2), (by_flag["--prompts"], 1))).memory_gb
    assert "--gpu" not in by_flag
    verdicts = [probe.ask(((knob, value),)) for knob in by_flag.values() for value in knob.values]
    alone = min(verdict.memory_gb for verdict in verdicts if verdict.plan is not None)
    assert pair < alone
    asked = question((pair + alone) / 2 / 0.9)
    changes = smallest_changes(asked)
    singles = [change for change in changes if len(change.settings) == 1]
    pairs = [change for change in changes if len(change.settings) == 2]
    assert singles and not any(change.fits for change in singles)
    assert pairs and all(change.fits for change in pairs)
    assert "--group-size 2 --prompts 1" in [change.flags() for change in pairs]
    lines = describe_changes(changes, asked.cluster.device.memory_gb * 0.9)
    assert any(line.startswith("    together: --group-size 2 --prompts 1 (algo.group_size=2 "
                               "algo.prompts_per_step=1): ") for line in lines), lines
    assert not any(line.startswith("    no change") for line in lines)


def test_a_feasible_question_prints_no_changes(capsys):
    assert main(FLAGS) == 0
    assert "what would fit" not in capsys.readouterr().out
