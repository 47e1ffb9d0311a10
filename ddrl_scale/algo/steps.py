"""Which denoising steps an iteration trains on, and how its data term is counted: the one rule
that the trainer (train/trainer.py), the FLOP count (telemetry/flops.py) and the memory and time
planner (telemetry/plan.py) all read, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """steps: the trained sampling-step indices, in order; data_positions: the positions in `steps`
    whose loss carries the data term; data_samples: global samples of one data-term forward."""

    steps: tuple[int, ...]
    data_positions: tuple[int, ...]
    data_samples: int

    @property
    def data_forwards(self) -> int:
        return len(self.data_positions)


def step_plan(algo, num_steps: int) -> StepPlan:
    """The trained steps of one iteration from the algo config section and sampler.num_steps.

    Every train_timestep_stride-th step from train_timestep_offset; the data term (data_beta > 0) on
    each of them, or with data_on_first_only on the first; it covers the step's anchor items
    (prompts_per_step), or under algo.preset=release every rollout sample (prompts x group_size),
    as the release computes it.
    """
    steps = tuple(range(algo.train_timestep_offset, num_steps, algo.train_timestep_stride))
    if not steps:
        from ddrl_scale.config.schema import ConfigError  # config is the bottom layer

        raise ConfigError(f"config key 'algo.train_timestep_offset': {algo.train_timestep_offset} "
                          f"leaves no sampling step to train on (sampler.num_steps={num_steps})")
    if algo.data_beta == 0:
        positions: tuple[int, ...] = ()
    else:
        positions = (0,) if algo.data_on_first_only else tuple(range(len(steps)))
    samples = algo.prompts_per_step * (algo.group_size if algo.preset == "release" else 1)
    return StepPlan(steps, positions, samples)
