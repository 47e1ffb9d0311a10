"""Rollouts: prompts -> SDE trajectories -> rewards -> advantages (colocated with the trainer here)."""

from ddrl_scale.rollout.colocated import RolloutBatch, generate_rollouts

__all__ = ["RolloutBatch", "generate_rollouts"]
