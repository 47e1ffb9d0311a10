"""Parallelism applied from outside the model: the Engine interface, its registry, the world."""

from ddrl_scale.parallel import deepspeed_engine, fsdp2, megatron_engine  # noqa: F401  (register engines)
from ddrl_scale.parallel.distributed import World, init_world
from ddrl_scale.parallel.engine import Engine, LocalEngine, available_engines, build_engine, register_engine

__all__ = ["Engine", "LocalEngine", "World", "available_engines", "build_engine", "init_world",
           "register_engine"]
