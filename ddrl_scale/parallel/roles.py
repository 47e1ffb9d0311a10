"""Roles of a disaggregated job: trainer ranks and rollout ranks of one torch.distributed world.

torchrun starts WORLD_SIZE processes; `rollout.num_ranks` of them are rollout workers (the last
ones, or those started with DDRL_ROLE=rollout: the SLURM script sets it per node), the others
train. One rendezvous store serves three kinds of process groups:

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
    trainer_ranks: list[int]  # job ranks of the trainers, trainer rank t = trainer_ranks[t]
    rollout_ranks: list[int]  # job ranks of the rollout workers, worker j = rollout_ranks[j]
    job: dist.ProcessGroup  # all ranks, gloo
    publish: dist.ProcessGroup | None  # trainer 0 + rollout ranks; None on other trainers
    timeout_s: float

    @property
    def num_trainers(self) -> int:
        return len(self.trainer_ranks)

    @property
    def num_rollout(self) -> int:
        return len(self.rollout_ranks)

    @property
    def controller(self) -> int:
        """Job rank of trainer rank 0: it orders the rollout ranks and broadcasts the weights."""
        return self.trainer_ranks[0]

    @property
    def is_controller(self) -> bool:
        return self.job_rank == self.controller

    def rollout_rank(self, index: int) -> int:
        """Job rank of rollout worker `index`."""
        return self.rollout_ranks[index]


def assign_roles(store: dist.Store, job_rank: int, job_size: int, num_rollout: int) -> list[str]:
    """Every rank's role. DDRL_ROLE (set per node by the SLURM script) places roles by node, since
    a c10d rendezvous numbers the nodes in no fixed order; without it the last num_rollout ranks
    serve rollouts. Each rank publishes its role on the store and reads everyone's."""
    default = "rollout" if job_rank >= job_size - num_rollout else "trainer"
    mine = os.environ.get("DDRL_ROLE", default)
    if mine not in ("trainer", "rollout"):
        raise ConfigError(f"DDRL_ROLE={mine!r}: expected trainer or rollout")
    store.set(f"ddrl/role/{job_rank}", mine)
    roles = [store.get(f"ddrl/role/{rank}").decode() for rank in range(job_size)]
    if roles.count("rollout") != num_rollout:
        raise ConfigError(f"config key 'rollout.num_ranks': {num_rollout} rollout ranks configured, "
                          f"but {roles.count('rollout')} ranks of the job have DDRL_ROLE=rollout")
    return roles


def _publish_group(store: dist.Store, job_rank: int, roles: Roles, device: torch.device,
                   timeout: datetime.timedelta) -> dist.ProcessGroup | None:
    members = [roles.controller, *roles.rollout_ranks]  # group rank 0 = the controller
    if job_rank not in members:
        return None
    prefixed = dist.PrefixStore("ddrl/publish/", store)
    rank, size = members.index(job_rank), len(members)
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("weight publishing on CUDA needs a torch built with NCCL")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


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
    assigned = assign_roles(store, job_rank, job_size, num_rollout)
    trainer_ranks = [rank for rank, role in enumerate(assigned) if role == "trainer"]
    rollout_ranks = [rank for rank, role in enumerate(assigned) if role == "rollout"]
    role = assigned[job_rank]
    members = trainer_ranks if role == "trainer" else rollout_ranks
    # libraries that read RANK / WORLD_SIZE (DeepSpeed, Megatron) must see the role's world
    os.environ.update(DDRL_JOB_RANK=str(job_rank), DDRL_JOB_WORLD_SIZE=str(job_size),
                      RANK=str(members.index(job_rank)), WORLD_SIZE=str(len(members)))
    world = init_world(config.run.device, config.parallel.timeout_s,
                       store=dist.PrefixStore(f"ddrl/{role}/", store))
    roles = Roles(role, job_rank, trainer_ranks, rollout_ranks, job, None, config.rollout.timeout_s)
    roles.publish = _publish_group(store, job_rank, roles, world.device, timeout)
    logger.info("job rank %d: %s rank %d of %d (trainer ranks %s, rollout ranks %s)", job_rank, role,
                world.rank, world.world_size, trainer_ranks, rollout_ranks)
    return roles, world
