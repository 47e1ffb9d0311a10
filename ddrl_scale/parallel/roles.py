"""Roles of a disaggregated job: trainer ranks and rollout ranks of one torch.distributed world.

torchrun starts WORLD_SIZE processes; the last `rollout.num_ranks` of them are rollout workers, the
others train. One rendezvous store serves three kinds of process groups:

* each role's default group, its own ranks only: the engines (FSDP2, DeepSpeed, Megatron), metrics
  and checkpoints of the trainers see the trainer ranks as their whole world, exactly as in a
  colocated run, so every engine works unchanged;
* the job group, every rank (gloo): orders to the rollout ranks and trajectories back;
* the publish group, trainer rank 0 and the rollout ranks: the weight broadcast (NCCL on GPUs).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddrl_scale.config.schema import ConfigError, RunConfig
from ddrl_scale.parallel.distributed import World, init_world

logger = logging.getLogger(__name__)


@dataclass
class Roles:
    role: str  # "trainer" | "rollout"
    job_rank: int
    num_trainers: int
    num_rollout: int
    job: dist.ProcessGroup  # all ranks, gloo
    publish: dist.ProcessGroup | None  # trainer 0 + rollout ranks; None on other trainers
    timeout_s: float

    @property
    def is_controller(self) -> bool:
        """Trainer rank 0 gives the rollout ranks their orders and broadcasts the weights."""
        return self.job_rank == 0

    def rollout_rank(self, index: int) -> int:
        """Job rank of rollout worker `index`."""
        return self.num_trainers + index


def _publish_group(store: dist.Store, job_rank: int, num_trainers: int, num_rollout: int,
                   device: torch.device, timeout: datetime.timedelta) -> dist.ProcessGroup | None:
    if 0 < job_rank < num_trainers:
        return None
    rank = 0 if job_rank == 0 else job_rank - num_trainers + 1
    prefixed = dist.PrefixStore("ddrl/publish/", store)
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("weight publishing on CUDA needs a torch built with NCCL")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, num_rollout + 1, options)
    return dist.ProcessGroupGloo(prefixed, rank, num_rollout + 1, timeout)


def init_roles(config: RunConfig) -> tuple[Roles, World]:
    """Join the job's rendezvous, split it into roles; returns this rank's roles and role world."""
    job_size, job_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    num_rollout = config.rollout.num_ranks
    num_trainers = job_size - num_rollout
    if num_trainers < 1:
        raise ConfigError(f"config key 'rollout.num_ranks': {num_rollout} rollout ranks leave no "
                          f"trainer rank in a job of {job_size} ranks (WORLD_SIZE); start more ranks "
                          f"(torchrun --nproc_per_node) or lower rollout.num_ranks")
    # the groups between roles wait as long as rollout.timeout_s: a rollout may take minutes
    timeout = datetime.timedelta(seconds=config.rollout.timeout_s)
    store, _, _ = next(dist.rendezvous("env://", job_rank, job_size,
                                       timeout=datetime.timedelta(seconds=config.parallel.timeout_s)))
    job = dist.ProcessGroupGloo(dist.PrefixStore("ddrl/job/", store), job_rank, job_size, timeout)
    role = "trainer" if job_rank < num_trainers else "rollout"
    role_rank = job_rank if role == "trainer" else job_rank - num_trainers
    role_size = num_trainers if role == "trainer" else num_rollout
    # libraries that read RANK / WORLD_SIZE (DeepSpeed, Megatron) must see the role's world
    os.environ.update(DDRL_JOB_RANK=str(job_rank), DDRL_JOB_WORLD_SIZE=str(job_size),
                      RANK=str(role_rank), WORLD_SIZE=str(role_size))
    world = init_world(config.run.device, config.parallel.timeout_s,
                       store=dist.PrefixStore(f"ddrl/{role}/", store))
    publish = _publish_group(store, job_rank, num_trainers, num_rollout, world.device, timeout)
    logger.info("job rank %d: %s rank %d of %d (%d trainer + %d rollout ranks)", job_rank, role,
                role_rank, role_size, num_trainers, num_rollout)
    return Roles(role, job_rank, num_trainers, num_rollout, job, publish,
                 config.rollout.timeout_s), world
