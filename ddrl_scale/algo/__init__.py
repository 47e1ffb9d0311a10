"""DDRL math as pure functions: schedules, samplers with log-prob, advantages, losses (registered)."""

from ddrl_scale.algo import advantages, losses  # noqa: F401  (registers the functions)
from ddrl_scale.algo.registry import available, get, register

__all__ = ["available", "get", "register"]
