"""`ddrl plan` on a question no plan answers: the smallest changes that would make one fit.

Place in the data flow (docs/architecture.md): after `telemetry/plan.py` has ranked the plans of
a workload on a cluster and rejected them all, this module asks the same model again with one
knob moved at a time (then two), nearest values first, and reports the first value of each that
gives a plan that fits, with the memory per GPU of the fastest such plan (or, when no value does,
the memory at the knob's far end). The knobs are the ones a user can turn without touching the
model: the group size and the prompts per step (the samples each rank holds), the GPU's memory
class, and the node count. Context parallel is not a separate knob: every plan already tries the
CP degrees the heads and tokens allow, and CP pays only where the prompts are fewer than the
data-parallel ranks, so it shows up as the plan of a "prompts" change (`parallel.cp=K`). LoRA is
not in the framework yet; the report says so.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from ddrl_scale.config import ConfigError, RunConfig
from ddrl_scale.telemetry.devices import DEVICES
from ddrl_scale.telemetry.plan import GB, Assumptions, Cluster, PlanResult, Workload, divisors, rank_plans

MAX_NODE_FACTOR = 8  # node counts up to this many times the question's are tried
PAIRS_SHOWN = 3


@dataclass(frozen=True)
class Knob:
    """One thing to change: its `ddrl plan` flag, its config key (None: the cluster's), and the
    values to try, nearest to the question's first."""

    flag: str
    key: str | None
    values: tuple


@dataclass
class Change:
    """A setting of one or more knobs and what the plan model says of it."""

    settings: tuple[tuple[Knob, object], ...]
    fits: bool
    plan: PlanResult | None  # the fastest plan that fits, else the one with the least memory
    cost: int = 0  # steps away from the question (the positions of the values, summed)
    extra: dict = field(default_factory=dict)

    @property
    def memory_gb(self) -> float:
        return plan_memory(self.plan) / GB if self.plan is not None else float("nan")

    def flags(self) -> str:
        return " ".join(f"{knob.flag} {value}" for knob, value in self.settings)

    def keys(self) -> str:
        return " ".join(f"{knob.key}={value}" for knob, value in self.settings if knob.key)

    def to_dict(self) -> dict:
        plan = self.plan
        return {"flags": self.flags(), "keys": self.keys(), "fits": self.fits,
                "plan": plan.plan.describe() if plan else None, "cp": plan.plan.cp if plan else None,
                "memory_gb": self.memory_gb,
                "step_s": plan.times.get("step_s") if plan and self.fits else None}


def plan_memory(result: PlanResult) -> float:
    """What must fit on one GPU of the plan: a trainer's or a rollout rank's, the larger."""
    return max(result.memory.get("total", 0.0), result.memory.get("rollout_rank_total", 0.0))


def knobs(config: RunConfig, cluster: Cluster) -> list[Knob]:
    algo, found = config.algo, []
    if algo.group_size > 2:  # groups of at least 2: the advantages are group-normalised
        found.append(Knob("--group-size", "algo.group_size", tuple(range(algo.group_size - 1, 1, -1))))
    smaller = [value for value in divisors(algo.prompts_per_step) if value < algo.prompts_per_step]
    if smaller:
        found.append(Knob("--prompts", "algo.prompts_per_step", tuple(reversed(smaller))))
    if cluster.device.name != "cpu":
        larger, seen = [], {cluster.device.memory_gb}
        for spec in sorted(DEVICES.values(), key=lambda spec: (spec.memory_gb, spec.name)):
            if spec.memory_gb not in seen and spec.memory_gb > cluster.device.memory_gb:
                larger.append(spec.name)
                seen.add(spec.memory_gb)
        if larger:
            found.append(Knob("--gpu", None, tuple(larger)))
    found.append(Knob("--nodes", None, tuple(range(cluster.nodes + 1,
                                                   MAX_NODE_FACTOR * cluster.nodes + 1))))
    return found


def _apply(config: RunConfig, cluster: Cluster, settings) -> tuple[RunConfig, Cluster]:
    algo = config.algo
    for knob, value in settings:
        if knob.key == "algo.group_size":
            algo = dataclasses.replace(algo, group_size=value)
        elif knob.key == "algo.prompts_per_step":
            algo = dataclasses.replace(algo, prompts_per_step=value)
        elif knob.flag == "--gpu":
            cluster = dataclasses.replace(cluster, device=DEVICES[value])
        elif knob.flag == "--nodes":
            cluster = dataclasses.replace(cluster, nodes=value)
    return dataclasses.replace(config, algo=algo), cluster


class Question:
    """The plan question being asked (config, pixels, cluster, assumptions, rollout choices), asked
    again under changed settings."""

    def __init__(self, config: RunConfig, pixels: tuple[int, ...] | None, cluster: Cluster,
                 assumptions: Assumptions, rollout_ranks: tuple[int, ...], rollout_tp: tuple[int, ...]):
        self.config, self.pixels, self.cluster, self.assumptions = config, pixels, cluster, assumptions
        self.rollout_ranks, self.rollout_tp = rollout_ranks, rollout_tp

    def ask(self, settings: tuple, cost: int = 0) -> Change | None:
        """The change's verdict; None when the settings are not a valid config (e.g. prompts that
        the rollout copies cannot split)."""
        try:
            config, cluster = _apply(self.config, self.cluster, settings)
        except ConfigError:
            return None
        feasible, rejected = rank_plans(Workload.from_config(config, self.pixels), cluster,
                                        self.assumptions, self.rollout_ranks, self.rollout_tp)
        if feasible:
            return Change(settings, True, feasible[0], cost)
        sized = [result for result in rejected if result.memory]
        return Change(settings, False, min(sized, key=plan_memory) if sized else None, cost)


def smallest_changes(question: Question) -> list[Change]:
    """For each knob alone, its nearest value that fits (or its far end, not fitting); when no knob
    alone fits, the cheapest fitting pairs of knobs, at most PAIRS_SHOWN of them."""
    found = knobs(question.config, question.cluster)
    singles = []
    for knob in found:
        change = None
        for position, value in enumerate(knob.values):
            candidate = question.ask(((knob, value),), position + 1)
            if candidate is not None and candidate.plan is not None:  # a value no plan can run at all
                change = candidate                                     # (sizes that do not divide) is
            if change is not None and change.fits:                    # passed over
                break
        if change is not None:
            singles.append(change)
    if any(change.fits for change in singles):
        return singles
    pairs = []
    for first, second in itertools.combinations(found, 2):
        combos = sorted(itertools.product(range(len(first.values)), range(len(second.values))),
                        key=lambda ij: (ij[0] + ij[1], ij))
        for i, j in combos:
            change = question.ask(((first, first.values[i]), (second, second.values[j])), i + j + 2)
            if change is not None and change.fits:
                pairs.append(change)
                break
    pairs.sort(key=lambda change: (change.cost, change.memory_gb))
    return singles + pairs[:PAIRS_SHOWN]


def describe_changes(changes: list[Change], usable_gb: float) -> list[str]:
    """The report's lines for `smallest_changes`."""
    if not changes:
        return []
    lines = [f"  what would fit (memory per GPU of the fastest plan that fits; {usable_gb:.1f} GB usable "
             "on the question's GPU):"]
    for change in changes:
        label = "alone:   " if len(change.settings) == 1 else "together:"
        keys = f" ({change.keys()})" if change.keys() else ""
        plan = change.plan
        if change.fits:
            cp = f", parallel.cp={plan.plan.cp}" if plan.plan.cp > 1 else ""
            lines.append(f"    {label} {change.flags()}{keys}: {plan.plan.describe()}{cp}, "
                         f"{change.memory_gb:.1f} GB per GPU, step {plan.times['step_s']:.3g} s")
        else:
            closest = f"{change.memory_gb:.1f} GB at best ({plan.plan.describe()})" if plan else "no plan"
            lines.append(f"    {label} {change.flags()}{keys}: not enough alone: {closest}")
    if not any(change.fits for change in changes):
        lines.append("    no change of one or two of these knobs fits")
    lines.append("    LoRA (training adapters instead of every weight): not in this framework yet")
    return lines
