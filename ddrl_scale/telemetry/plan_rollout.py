"""The rollout side of the `ddrl plan` model: separate rollout ranks and their rollout TP copies.

What one rollout rank holds, the rules the rollout side must keep and which rollout TP sizes to
try. A separate rollout rank holds its share of a bf16 / fp32 inference copy (1 / rollout TP of the
projections, the rest whole), a publish receive buffer, and its copy's samples' trajectories and
the temporaries of a forward without grad (those of the split layers divided by rollout TP); checked
against measured CPU peaks of sampling on a whole and a 2-way split copy in tests/test_plan.py.
Builds on `telemetry/plan.py`'s dataclasses and counts, so plan.py imports it inside its functions.
"""

from __future__ import annotations

from ddrl_scale.telemetry.plan import (
    GB,
    Assumptions,
    Cluster,
    ParallelPlan,
    Workload,
    divisors,
    inference_elements,
    parameter_counts,
    trajectory_bytes_per_sample,
)

PUBLISH_BUCKET_BYTES = 256e6  # rollout.publish_bucket_mb's default: the receive buffer


def rollout_reasons(workload: Workload, plan: ParallelPlan) -> list[str]:
    """Why the rollout side of `plan` cannot run (the rules config/schema.py and
    parallel/inference_tp.py enforce for rollout.num_ranks and rollout.tp_size)."""
    dit, tp, reasons = workload.dit, plan.rollout_tp, []
    if tp < 1:
        return [f"rollout TP={tp} must be >= 1"]
    if tp > 1 and not plan.rollout_ranks:
        return [f"rollout TP={tp} needs separate rollout ranks (colocated rollouts use the trainers)"]
    if dit.num_heads % tp or dit.mlp_hidden % tp:
        reasons.append(f"rollout TP={tp} must divide num_heads={dit.num_heads} and the MLP width "
                       f"{dit.mlp_hidden}")
    if plan.rollout_ranks % tp:
        reasons.append(f"rollout TP={tp} must divide the {plan.rollout_ranks} rollout ranks")
    elif plan.rollout_ranks and workload.prompts_per_step % plan.rollout_copies:
        reasons.append(f"algo.prompts_per_step={workload.prompts_per_step} is not a multiple of the "
                       f"{plan.rollout_copies} rollout copies ({plan.rollout_ranks} rollout ranks / "
                       f"rollout TP {tp}; each copy samples whole prompt groups)")
    return reasons


def rollout_rank_memory(workload: Workload, plan: ParallelPlan) -> dict[str, float]:
    """Peak bytes on one separate rollout rank of `plan`, by component (empty without rollout ranks).

    The inference copy is in the run's precision (bf16 or fp32) with no gradients or optimizer; a
    tensor-parallel copy keeps 1 / rollout_tp of the split projections and the rest whole. Every
    rank of a copy samples the copy's whole batch (activations outside the split layers are whole),
    so each holds the whole trajectories; the copy's first rank also decodes and scores them.
    Not modelled: with policy lag > 0 the scoring thread may still hold the previous batch (its
    trajectories and videos) while the next one is sampled.
    """
    if not plan.rollout_ranks:
        return {}
    dit, tp = workload.dit, plan.rollout_tp
    total_params, split_params = parameter_counts(dit)
    copy_bytes = 2 if workload.dtype == "bf16" else 4
    samples = workload.samples / plan.rollout_copies
    out = {
        "parameters": copy_bytes * (split_params / tp + total_params - split_params),
        # published tensors arrive whole in buckets of rollout.publish_bucket_mb; rotary angles
        "buffers": PUBLISH_BUCKET_BYTES + 4 * dit.num_tokens * (dit.hidden_size // dit.num_heads) / 2,
        "trajectory": samples * trajectory_bytes_per_sample(workload),
        # the copy's forward is split like a megatron TP group's, without CP
        "activations": samples * inference_elements(workload, ParallelPlan(tp, tp=tp)) * copy_bytes,
    }
    out["total"] = sum(out.values())
    return out


def rollout_side_fits(workload: Workload, plan: ParallelPlan, cluster: Cluster,
                      assumptions: Assumptions = Assumptions()) -> bool:  # noqa: B008 (frozen)
    """Can the rollout ranks of `plan` run it: the rollout rules hold and a rank fits in memory."""
    if rollout_reasons(workload, plan):
        return False
    usable = cluster.device.memory_gb * GB * assumptions.usable_memory_fraction
    return rollout_rank_memory(workload, plan).get("total", 0.0) <= usable


def rollout_tp_candidates(workload: Workload, cluster: Cluster, rollout_ranks: int,
                          rollout_tp: tuple[int, ...] = (1,),
                          assumptions: Assumptions = Assumptions()) -> tuple[int, ...]:  # noqa: B008 (frozen)
    """The rollout TP sizes to consider with `rollout_ranks` rollout ranks: those asked for, and,
    when none of them can run (a copy does not fit on a GPU, or there would be more copies than the
    prompts split into), the smallest one that can. A larger rollout TP than needed only adds
    all-reduces (every rollout rank computes its 1 / rollout ranks of the FLOPs either way)."""
    if not rollout_ranks:
        return (1,)

    def runs(tp: int) -> bool:
        return rollout_side_fits(workload, ParallelPlan(cluster.gpus - rollout_ranks,
                                                        rollout_ranks=rollout_ranks, rollout_tp=tp),
                                 cluster, assumptions)
    if any(runs(tp) for tp in rollout_tp):
        return tuple(rollout_tp)
    smallest = next((tp for tp in divisors(rollout_ranks) if runs(tp)), None)
    return tuple(rollout_tp) if smallest is None else (*rollout_tp, smallest)
