"""A rollout rank of a disaggregated job: orders in, trajectories out, weights by publish.

It holds an inference copy of the policy (the run's precision; no optimizer, no gradients), whole
or split over `rollout.tp_size` rollout ranks (parallel/inference_tp.py), and obeys trainer rank 0's
orders in the order they come: `publish` (receive a new weights version), `generate` (sample its
copy's share of a step's prompt groups with the SDE sampler, conditioned on the caption embeddings
the order carries when the anchor shards hold them, else on its own text encoder's; then, on a
scoring thread while the next order is served, decode, score, normalise advantages within each group
and send each trainer the samples of its prompts: the first rank of a tensor-parallel copy does this
part, the others only sample with it), `stop`.
The noise of every sample is keyed by (seed, step, global sample index), exactly as in colocated
rollouts, so where the samples are drawn changes nothing but the floating-point batch shapes.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh

from ddrl_scale import kernels
from ddrl_scale.algo.schedules import sigma_schedule
from ddrl_scale.config import RunConfig
from ddrl_scale.models import build_model, build_text_encoder, build_vae
from ddrl_scale.parallel.distributed import World
from ddrl_scale.parallel.inference_tp import full_parameters, local_parameter_count, shard_inference_copy
from ddrl_scale.parallel.roles import Roles
from ddrl_scale.rewards import WeightedRewards
from ddrl_scale.rollout.colocated import sample_rollouts, score_rollouts
from ddrl_scale.rollout.publish import publish_dtype, receive_weights, weights_checksum
from ddrl_scale.rollout.transport import Channel
from ddrl_scale.runtime import autocast
from ddrl_scale.storage.run_files import atomic_write_json

logger = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(self, config: RunConfig, roles: Roles, world: World):
        self.config, self.roles, self.device = config, roles, world.device
        self.index = roles.rollout_ranks.index(roles.job_rank)
        tp = config.rollout.tp_size
        self.leader = self.index % tp == 0  # scores and sends for its tensor-parallel copy
        # the weights that count come with the first publish; the architecture from the config
        self.model = build_model(config).to(self.device, publish_dtype(config.run.dtype))
        self.model.eval().requires_grad_(False)
        if tp > 1:  # the rollout world's ranks, copy by copy: ranks [c * tp, (c + 1) * tp) form copy c
            mesh = init_device_mesh(self.device.type, (roles.num_rollout // tp, tp),
                                    mesh_dim_names=("copy", "tp"))
            shard_inference_copy(self.model, mesh["tp"])
        # this rank's share of the copy: what an operator checks against the GPU's memory
        self.local_parameters = local_parameter_count(self.model)
        self.text_encoder = build_text_encoder(config, self.device)
        # only the copy's first rank decodes and scores: the others need no VAE and no reward models
        self.vae = build_vae(config, self.device) if self.leader else None
        self.rewards = (WeightedRewards.from_specs(config.rewards)
                        if self.leader else None)
        self.sigmas = sigma_schedule(config.sampler.num_steps, config.sampler.shift)
        # the trainers' log-prob kernel: the behaviour log-probs must be computed as training does
        self.log_prob_fn = functools.partial(
            kernels.sde_log_prob, backend=kernels.resolve_backend(config.kernels.backend, self.device))
        video = config.video
        self.latent_shape = (video.channels, video.num_frames, video.height, video.width)
        self.channel = Channel(roles.job, roles.job_rank, config.rollout.timeout_s)
        self.version, self.checksum = -1, None
        # one scoring thread: batches are scored and sent in the order they were sampled
        self.scorer = ThreadPoolExecutor(1, thread_name_prefix="rollout-score")
        self.scoring: deque[Future] = deque()
        self.times = {"idle": 0.0, "generate": 0.0, "publish": 0.0}
        # a status file per worker (pid, host, version, last step): what an operator looks at first
        self.status_path = Path(config.run.output_dir) / "rollout" / f"worker{self.index}.json"
        self.status_path.parent.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.run.dtype):
            return self.model(latents, sigma, text)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts, self.device)

    def write_status(self, state: str, step: int | None = None) -> None:
        status = {"pid": os.getpid(), "host": socket.gethostname(), "job_rank": self.roles.job_rank,
                  "slurm_node": os.environ.get("SLURMD_NODENAME"),
                  "state": state, "version": self.version, "step": step, "times": self.times,
                  "tp_size": self.config.rollout.tp_size, "local_parameters": self.local_parameters}
        atomic_write_json(self.status_path, status, indent=None)  # readers never see half of it

    def generate(self, order: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Sample on this thread (it needs the weights), then score and send on the scoring thread,
        so decoding and rewards (a remote reward service too) overlap the next batch's sampling."""
        config, step, start = self.config, order["step"], time.perf_counter()
        given = None  # the anchor shards' caption embeddings (one per prompt), when the order has them
        if "text" in tensors:
            given = tensors["text"].to(self.device).repeat_interleave(config.algo.group_size, dim=0)
        expanded, text, trajectory = sample_rollouts(
            self.velocity, self.encode_text if given is None else (lambda _: given), order["prompts"],
            self.latent_shape, self.sigmas, config.sampler, config.algo, config.run.seed, step,
            order["first_prompt_index"], self.device, self.log_prob_fn)
        self.times["generate"] += time.perf_counter() - start
        if not self.leader:
            return  # the copy's first rank holds the same samples: it scores and sends them
        # the version and checksum of the weights that sampled this batch, before a publish moves on
        stamp = {"version": self.version, "checksum": self.checksum,
                 "precomputed_text": "text" in tensors}
        self.scoring.append(self.scorer.submit(self.score_and_send, order, expanded, text, trajectory,
                                               stamp, start))

    def score_and_send(self, order: dict, expanded: list[str], text: torch.Tensor,
                       trajectory, stamp: dict, start: float) -> None:
        try:
            self._score_and_send(order, expanded, text, trajectory, stamp, start)
        except BaseException:
            # the main thread may be blocked waiting for an order, and the trainers for these
            # trajectories: end the process now, so torchrun stops the job with this error in the log
            logger.exception("rollout worker %d (job rank %d): scoring step %d failed", self.index,
                             self.roles.job_rank, order["step"])
            logging.shutdown()
            os._exit(1)

    def _score_and_send(self, order: dict, expanded: list[str], text: torch.Tensor,
                        trajectory, stamp: dict, start: float) -> None:
        config = self.config
        batch = score_rollouts(self.vae.decode, self.rewards, expanded, text, trajectory, config.algo,
                               stamp["version"])
        seconds = time.perf_counter() - start  # sampling to scored, overlap included
        group = config.algo.group_size
        for dst, low, high in order["targets"]:
            part = slice(low * group, high * group)
            tensors = {"states": batch.trajectory.states[:, part],
                       "log_probs": batch.trajectory.log_probs[:, part],
                       "advantages": batch.advantages[part], "total_reward": batch.total_reward[part],
                       **{f"reward/{name}": value[part] for name, value in batch.rewards.items()}}
            header = {"step": order["step"], **stamp, "worker": self.index,
                      "samples": len(batch.prompts), "seconds": seconds, **self.times}
            self.channel.send(dst, header, tensors)

    def finish_scoring(self, all_of_them: bool) -> None:
        """Raise a scoring thread's error here; with all_of_them, wait for every batch first."""
        while self.scoring and (all_of_them or self.scoring[0].done()):
            self.scoring.popleft().result()

    def run(self) -> None:
        """Obey orders until `stop`."""
        self.write_status("waiting")
        mark = time.perf_counter()
        while True:
            # the trainers may spend a while between orders (evaluation, checkpoints, a compile, a
            # slow collective); a dead trainer breaks the connection at once anyway
            order, tensors = self.channel.recv(self.roles.controller, "order",
                                         self.config.rollout.timeout_s + self.config.parallel.timeout_s)
            start = time.perf_counter()
            self.times["idle"] += start - mark
            self.finish_scoring(all_of_them=False)
            if order["op"] == "stop":
                self.finish_scoring(all_of_them=True)
                break
            if order["op"] == "publish":
                self.version = receive_weights(self.model, self.roles.publish, self.device)
                if self.config.rollout.verify_publish:
                    self.checksum = weights_checksum(full_parameters(self.model))
                self.times["publish"] += time.perf_counter() - start
                self.write_status("published", None)
            elif order["op"] == "generate":
                self.write_status("generating", order["step"])
                self.generate(order, tensors)
                self.write_status("sampled", order["step"])
            else:
                raise ValueError(f"rollout worker {self.index}: unknown order '{order['op']}'")
            mark = time.perf_counter()
        self.scorer.shutdown(wait=True)
        self.channel.flush(timeout_s=60)
        self.write_status("stopped")
        logger.info("rollout worker %d stopped (version %d)", self.index, self.version)
