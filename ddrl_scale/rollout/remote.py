"""The trainers' side of disaggregated rollouts: orders out, trajectories in, weights published.

Step s's prompts are the captions of step s's anchor batch (the paired data items stay with the
trainers that read them; their precomputed caption embeddings, when the shards hold them, travel
with the order). Trainer rank 0 orders each rollout copy (one rank, or `rollout.tp_size` ranks
holding a tensor-parallel copy) to sample its contiguous share of the step's prompt groups and to
send each trainer the samples of that trainer's prompts; every trainer receives its own. With
rollout.max_policy_lag = k and sync_every = m, orders run k - m + 1 steps ahead of training, so a
rollout for step s is always sampled by weights of version >= s - k, and sampling overlaps training
when k > 0.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from ddrl_scale.algo.samplers import Trajectory
from ddrl_scale.config import RunConfig
from ddrl_scale.data.anchor import AnchorBatch
from ddrl_scale.parallel.distributed import World, check_object_device, collective
from ddrl_scale.parallel.engine import Engine
from ddrl_scale.parallel.roles import Roles
from ddrl_scale.rollout.colocated import RolloutBatch
from ddrl_scale.rollout.publish import publish_dtype, publish_weights
from ddrl_scale.rollout.transport import Channel

logger = logging.getLogger(__name__)


def overlap(a: slice, b: slice) -> tuple[int, int] | None:
    low, high = max(a.start, b.start), min(a.stop, b.stop)
    return (low, high) if low < high else None


class RemoteRollouts:
    def __init__(self, config: RunConfig, roles: Roles, world: World, engine: Engine,
                 prompt_slices: list[slice], batch_text: Callable[[AnchorBatch, int], torch.Tensor],
                 sigmas: torch.Tensor):
        """prompt_slices[t]: the step's prompts of trainer rank t (its data-parallel share);
        batch_text(batch, G): the text embeddings of the batch's captions, each repeated G times."""
        self.config, self.roles, self.world, self.engine = config, roles, world, engine
        self.prompt_slices, self.batch_text, self.sigmas = prompt_slices, batch_text, sigmas
        self.channel = Channel(roles.job, roles.job_rank, config.rollout.timeout_s)
        prompts, copies = config.algo.prompts_per_step, roles.num_rollout // config.rollout.tp_size
        self.worker_slices = [slice(j * prompts // copies, (j + 1) * prompts // copies)
                              for j in range(copies)]
        self.requested: deque[int] = deque()
        self.checksums: dict[int, str] = {}
        self.version = -1
        self.last_publish: dict = {}

    def copy_ranks(self, copy: int) -> list[int]:
        """Job ranks of rollout copy `copy`; the first one scores and sends its trajectories."""
        tp = self.config.rollout.tp_size
        return [self.roles.rollout_rank(j) for j in range(copy * tp, (copy + 1) * tp)]

    @property
    def ahead(self) -> int:
        """Steps whose orders go out before the current step trains."""
        return self.config.rollout.max_policy_lag - self.config.rollout.sync_every + 1

    # -- weights ---------------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Every trainer calls: stream the engine's weights to the rollout ranks as `version`."""
        if self.roles.is_controller:
            for j in range(self.roles.num_rollout):
                self.channel.send(self.roles.rollout_rank(j), {"op": "publish", "version": version})
        settings = self.config.rollout
        result = publish_weights(self.engine, self.roles, version,
                                 int(settings.publish_bucket_mb * 2**20),
                                 publish_dtype(self.config.run.dtype), self.world.device,
                                 settings.verify_publish)
        if settings.verify_publish:
            self.checksums[version] = result["checksum"]
        self.version, self.last_publish = version, result

    def after_step(self, step: int) -> float:
        """Publish when due after optimizer step `step`; returns the seconds spent."""
        if step % self.config.rollout.sync_every:
            return 0.0
        self.publish(step)
        return self.last_publish["seconds"]

    # -- rollouts --------------------------------------------------------------------------------
    def request(self, step: int, batch: AnchorBatch) -> None:
        """Every trainer calls with its share of step `step`'s anchor batch; trainer 0 orders."""
        text = None if batch.text is None else batch.text.cpu()
        shares = [(self.prompt_slices[0].start, batch.captions, text)]
        if self.world.distributed:
            shares = [None] * self.world.world_size
            check_object_device("all_gather_object(prompts)", self.world)
            collective("all_gather_object(prompts)",
                       lambda: dist.all_gather_object(shares, (self.prompt_slices[self.world.rank].start,
                                                               batch.captions, text)))
        self.requested.append(step)
        if not self.roles.is_controller:
            return
        prompts = [""] * self.config.algo.prompts_per_step
        texts = [None] * self.config.algo.prompts_per_step
        for start, captions, embeddings in shares:
            prompts[start: start + len(captions)] = captions
            if embeddings is not None:
                texts[start: start + len(captions)] = list(embeddings)
        for j, share in enumerate(self.worker_slices):
            targets = []  # [trainer job rank, first, end) of this worker's prompts, in its share
            for trainer, mine in enumerate(self.prompt_slices):
                common = overlap(share, mine)
                if common is not None:
                    targets.append([self.roles.trainer_ranks[trainer], common[0] - share.start,
                                    common[1] - share.start])
            order = {"op": "generate", "step": step, "first_prompt_index": share.start,
                     "prompts": prompts[share], "targets": targets}
            given = texts[share]
            tensors = {"text": torch.stack(given)} if given and all(t is not None for t in given) else None
            for rank in self.copy_ranks(j):
                self.channel.send(rank, order, tensors)

    def _collect(self, step: int) -> list[tuple[dict, dict[str, torch.Tensor]]]:
        expected = self.requested.popleft()
        if expected != step:
            raise RuntimeError(f"trainer expected rollouts of step {expected}, was asked for {step}")
        mine, pieces = self.prompt_slices[self.world.rank], []
        for j, share in enumerate(self.worker_slices):
            if overlap(share, mine) is None:
                continue
            source = self.copy_ranks(j)[0]
            header, tensors = self.channel.recv(
                source, f"trajectories of step {step} (rollout worker {j})")
            if header["step"] != step:
                raise RuntimeError(f"rollout worker {j} (job rank {source}) sent step "
                                   f"{header['step']}, expected {step}")
            pieces.append((header, tensors))
        return pieces

    def receive(self, step: int, batch: AnchorBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """This trainer's samples of step `step` (requested before), and the rollout metrics."""
        pieces = self._collect(step)  # the trainer's wait is its "rollout" phase (train/trainer.py)
        return self._assemble(batch, pieces), self._metrics(step, pieces)

    def _assemble(self, batch: AnchorBatch, pieces: list) -> RolloutBatch:
        device, group = self.world.device, self.config.algo.group_size

        def joined(name: str, dim: int = 0) -> torch.Tensor:
            return torch.cat([tensors[name] for _, tensors in pieces], dim=dim).to(device)

        expanded = [caption for caption in batch.captions for _ in range(group)]
        trajectory = Trajectory(joined("states", 1), None, joined("log_probs", 1), self.sigmas)
        names = [key.split("/", 1)[1] for key in pieces[0][1] if key.startswith("reward/")]
        return RolloutBatch(expanded, self.batch_text(batch, group), trajectory, None,
                            {name: joined(f"reward/{name}") for name in names}, joined("total_reward"),
                            joined("advantages"), min(header["version"] for header, _ in pieces))

    def _metrics(self, step: int, pieces: list) -> dict[str, float]:
        versions = [header["version"] for header, _ in pieces]
        lag = step - min(versions)
        if lag > self.config.rollout.max_policy_lag or min(versions) < 0:
            raise RuntimeError(f"rollouts of step {step} were sampled by weights version "
                               f"{min(versions)}: beyond rollout.max_policy_lag="
                               f"{self.config.rollout.max_policy_lag}")
        metrics = {"policy_lag": float(lag), "policy_lag_max": float(lag),
                   # 1: the rollouts were conditioned on the shards' caption embeddings
                   "rollout_precomputed_text": float(all(h["precomputed_text"] for h, _ in pieces))}
        if self.config.rollout.verify_publish:
            matches = [header["checksum"] == self.checksums.get(header["version"]) for header, _ in pieces]
            if not all(matches):
                raise RuntimeError(f"step {step}: a rollout rank's weights checksum differs from the "
                                   f"trainers' full weights of version {min(versions)}")
            metrics["publish_checksum_ok"] = 1.0
        idle = [h["idle"] / max(1e-9, h["idle"] + h["generate"] + h["publish"]) for h, _ in pieces]
        metrics["rollout_idle_fraction"] = sum(idle) / len(idle)
        # a copy's own rate while it samples; with balanced shares the job's rate is the number of
        # copies times it (denoising steps/s: times sampler.num_steps)
        rate = sum(h["samples"] / h["seconds"] for h, _ in pieces) / len(pieces)
        copies = len(self.worker_slices)
        metrics["rollout_videos_per_s_worker"] = rate
        metrics["rollout_videos_per_s"] = rate * copies
        metrics["rollout_denoise_steps_per_s"] = rate * copies * self.config.sampler.num_steps
        return metrics

    def close(self) -> None:
        """Take (and drop) the rollouts still under way, then stop the rollout ranks."""
        while self.requested:
            self._collect(self.requested[0])
        if self.roles.is_controller:
            for rank in self.roles.rollout_ranks:
                self.channel.send(rank, {"op": "stop"})
        self.channel.flush(timeout_s=60)
