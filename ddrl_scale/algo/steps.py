"""Which denoising steps an iteration trains on, and how its data term is counted: the one rule
that the trainer (train/trainer.py), the FLOP count (telemetry/flops.py) and the memory and time
planner (telemetry/plan.py) all read, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddrl_scale.algo.noise import TRAIN_STEPS, key_seed


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


def step_plan(algo, num_steps: int, seed: int = 0, iteration: int = 0) -> StepPlan:
    """The trained steps of iteration `iteration` from the algo config section and sampler.num_steps.

    Every train_timestep_stride-th step from train_timestep_offset, then algo.train_random_steps
    more drawn without replacement from the others (the release's `train_on` entries of -1,
    cosmos-rl t2v_model.py), keyed by (seed, iteration): a resumed run draws the same ones without
    any saved RNG state, and the count per iteration is fixed. The data term (data_beta > 0) on
    each of them, or with data_on_first_only on the first; it covers the step's anchor items
    (prompts_per_step), or under algo.preset=release every rollout sample (prompts x group_size),
    as the release computes it.
    """
    steps = tuple(range(algo.train_timestep_offset, num_steps, algo.train_timestep_stride))
    extra = algo.train_random_steps
    if extra:
        rest = [index for index in range(num_steps) if index not in steps]
        if extra > len(rest):
            from ddrl_scale.config.schema import ConfigError

            raise ConfigError(f"config key 'algo.train_random_steps': {extra} random steps, but only "
                              f"{len(rest)} sampling steps are left outside the stride")
        generator = torch.Generator().manual_seed(key_seed(seed, TRAIN_STEPS, iteration))
        order = torch.randperm(len(rest), generator=generator)[:extra].tolist()
        steps = steps + tuple(rest[position] for position in order)
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
