"""Parallelism applied from outside the model: the Engine interface and its registry."""

from ddrl_scale.parallel.engine import Engine, LocalEngine, build_engine, register_engine

__all__ = ["Engine", "LocalEngine", "build_engine", "register_engine"]
