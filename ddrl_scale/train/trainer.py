"""The DDRL trainer loop: anchor batch -> rollouts -> rewards -> advantages -> loss -> step -> save.

Every stage of docs/architecture.md's data flow runs here in turn; with rollout.mode=colocated the
rollouts are sampled in this process, with disaggregated they are ordered from the rollout ranks
(rollout/remote.py) and the weights are published to them after the optimizer step. The loop
(`train`) is short; each stage is a method or a pure function of algo/, rollout/, rewards/.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from collections import deque
from pathlib import Path

import torch

from ddrl_scale import algo, kernels
from ddrl_scale.algo.edm import edm_training_log_prob, schedule_from
from ddrl_scale.algo.losses import data_loss_weight, kl_penalty, policy_log_ratio
from ddrl_scale.algo.noise import CAPTION_DROP, data_term_draws, keyed_normal
from ddrl_scale.algo.schedules import add_noise, sigma_schedule
from ddrl_scale.algo.steps import step_plan
from ddrl_scale.config import ConfigError, RunConfig, save_config
from ddrl_scale.config.schema import check_run_plan
from ddrl_scale.data.anchor import AnchorBatch
from ddrl_scale.data.sharded import build_loader, gather_state
from ddrl_scale.models import build_model, build_text_encoder, build_vae
from ddrl_scale.parallel import World, build_engine, init_world
from ddrl_scale.parallel.distributed import barrier, check_object_device, reduce_metrics
from ddrl_scale.parallel.roles import Roles
from ddrl_scale.rewards import WeightedRewards
from ddrl_scale.rollout import RolloutBatch, generate_rollouts
from ddrl_scale.rollout.remote import RemoteRollouts
from ddrl_scale.runtime import autocast, seed_everything
from ddrl_scale.telemetry.gpu import TelemetrySampler
from ddrl_scale.telemetry.throughput import RUN_DTYPES, device_peak_flops, step_throughput
from ddrl_scale.telemetry.timers import PhaseTimer
from ddrl_scale.train.anchor_data import demo_shards
from ddrl_scale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ddrl_scale.train.early_checks import check_before_build
from ddrl_scale.train.evaluate import EvalResult, eval_prompts, evaluate
from ddrl_scale.train.loggers import build_loggers
from ddrl_scale.train.metrics import MetricsWriter
from ddrl_scale.train.preemption import StopRequest
from ddrl_scale.train.progress import StepProgress

logger = logging.getLogger(__name__)


def reward_metrics(rewards: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-reward means over the valid samples, and the valid fractions (reward_valid_rate: all
    rewards together); a NaN score marks a sample whose reward failed."""
    out, valid_total, count = {}, 0.0, 0
    for name, values in rewards.items():
        valid = torch.isfinite(values)
        out[f"reward_{name}_mean"] = values[valid].mean().item() if bool(valid.any()) else float("nan")
        out[f"reward_{name}_valid_rate"] = valid.float().mean().item()
        valid_total, count = valid_total + valid.sum().item(), count + valid.numel()
    out["reward_valid_rate"] = valid_total / max(1, count)
    return out


class TimedRewards:
    """The run's WeightedRewards, its scoring timed as the 'reward' phase."""

    def __init__(self, rewards: WeightedRewards, timer: PhaseTimer):
        self.rewards, self.timer = rewards, timer

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        with self.timer.phase("reward"):
            return self.rewards(videos, prompts)

    def __getattr__(self, name: str):
        return getattr(self.rewards, name)


def local_slice(total: int, world: World, model_parallel: int, what: str) -> slice:
    """This rank's contiguous share of `total` items. The ranks of one model-parallel group
    (context- or tensor-parallel; consecutive ranks) share the same items, so total must divide by
    the data-parallel size, world size / model_parallel."""
    data_parallel = world.world_size // model_parallel
    if total % data_parallel:
        raise ConfigError(f"{what}={total} must be a multiple of the {data_parallel} data-parallel "
                          f"ranks ({world.world_size} ranks / {model_parallel} model-parallel)")
    share, dp_rank = total // data_parallel, world.rank // model_parallel
    return slice(dp_rank * share, (dp_rank + 1) * share)


class Trainer:
    def __init__(self, config: RunConfig, world: World | None = None, roles: Roles | None = None):
        """roles: this trainer rank's place in a disaggregated job (None: colocated rollouts)."""
        self.config = config
        self.run_dir = Path(config.run.output_dir)
        seed_everything(config.run.seed)
        self.world = world or init_world(config.run.device, config.parallel.timeout_s)
        self.device = self.world.device
        check_run_plan(config, self.world.world_size)  # named errors before anything is built
        check_before_build(config)  # shards vs video.*, resume, model and reward files (early_checks)
        # every rank reads the step's global prompt batch and keeps its own contiguous share
        self.model_parallel = config.parallel.cp * config.parallel.tp
        self.prompt_slice = local_slice(config.algo.prompts_per_step, self.world, self.model_parallel,
                                        "algo.prompts_per_step")
        self.text_encoder = build_text_encoder(config, self.device)
        self.vae = build_vae(config, self.device)
        self.rewards = WeightedRewards.from_specs(config.rewards)
        self.loss_fn = algo.get("loss", config.algo.name)
        model = build_model(config)
        # Flow-GRPO's reverse KL, and rollouts from the reference (the release's on_policy=false),
        # need the starting policy (updated every algo.update_ref_every steps); DDRL does not
        uses_reference = config.algo.kl_beta > 0 or config.rollout.from_reference
        self.reference = copy.deepcopy(model).requires_grad_(False).to(self.device) \
            if uses_reference else None
        trained_per_iteration = len(step_plan(config.algo, config.sampler.num_steps).steps)
        self.engine = build_engine(model, config.optim, config.parallel, self.world, config.run.dtype,
                                   accumulation_steps=trained_per_iteration)
        if self.world.is_main:  # rank 0 writes the demo shards (once); the others then find them
            demo_shards(config)
        barrier(self.world, "anchor shards ready")
        data = config.data
        self.loader = build_loader(
            demo_shards(config), config.algo.prompts_per_step, split=data.split, seed=config.run.seed,
            rank=self.world.rank // self.model_parallel,
            world_size=self.world.world_size // self.model_parallel, num_workers=data.num_workers,
            prefetch=data.prefetch, shuffle_buffer=data.shuffle_buffer, buckets=data.buckets or None,
            index=data.index, encode=self.vae.encode,
            latents_dtype=torch.float32 if data.latents_dtype == "fp32" else None,
            latent_shape=(config.video.channels, config.video.num_frames, config.video.height,
                          config.video.width))
        self.sharded_data = data.split == "sharded"
        self.sigmas = sigma_schedule(config.sampler.num_steps, config.sampler.shift)
        self.edm_schedule = schedule_from(config.sampler) if config.sampler.kind == "edm_ab2" else None
        video = config.video
        self.latent_shape = (video.channels, video.num_frames, video.height, video.width)
        self.step = 0
        # phases of each step; on a GPU every boundary synchronises so kernels land where launched
        self.timer = PhaseTimer(synchronize=self.device.type == "cuda", device=self.device)
        self.peak_flops = device_peak_flops(self.device, RUN_DTYPES[config.run.dtype])
        # the fused loss kernels, chosen (and logged) once; the rollouts score with the same kernel
        self.kernel_backend = kernels.resolve_backend(config.kernels.backend, self.device)
        self.log_prob_fn = functools.partial(kernels.sde_log_prob, backend=self.kernel_backend)
        self.loggers = build_loggers(self.run_dir, config.train.tensorboard, config.train.wandb_project,
                                     config.run.name, dataclasses.asdict(config), self.world.is_main)
        # read-ahead anchor batches (step, batch, loader state before it) whose rollouts are ordered
        self.pending: deque[tuple[int, AnchorBatch, dict]] = deque()
        self.remote = None
        if roles is not None:
            slices = [local_slice(config.algo.prompts_per_step, dataclasses.replace(self.world, rank=rank),
                                  self.model_parallel, "algo.prompts_per_step")
                      for rank in range(self.world.world_size)]
            self.remote = RemoteRollouts(config, roles, self.world, self.engine, slices,
                                         self.batch_text, self.sigmas)

    # -- stages -------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts, self.device)

    @torch.no_grad()
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.engine.forward(latents, sigma, text)

    @torch.no_grad()
    def reference_velocity(self, latents: torch.Tensor, sigma: torch.Tensor,
                           text: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.run.dtype):  # as the policy runs
            return self.reference(latents, sigma, text)

    @torch.no_grad()
    def update_reference(self) -> None:
        """algo.update_ref_every: the reference becomes a copy of the policy (every rank calls:
        a sharded engine gathers one tensor at a time)."""
        parameters = dict(self.reference.named_parameters())
        for name, tensor in self.engine.full_weights():
            parameters[name].copy_(tensor)

    def next_batch(self) -> AnchorBatch:
        batch = self.loader.next_batch()
        text = getattr(batch, "text", None)  # precomputed caption embeddings, when present
        if self.sharded_data:  # already this data-parallel rank's share
            return AnchorBatch(batch.latents, batch.captions, batch.keys, text)
        share = self.prompt_slice
        return AnchorBatch(batch.latents[share], batch.captions[share], batch.keys[share],
                           None if text is None else text[share])

    def batch_text(self, batch: AnchorBatch, repeats: int = 1) -> torch.Tensor:
        """Text embeddings of the batch's captions, each repeated `repeats` times in order: the
        shards' precomputed ones when present, else the run's text encoder."""
        if batch.text is not None:
            return batch.text.to(self.device).repeat_interleave(repeats, dim=0)
        return self.encode_text([caption for caption in batch.captions for _ in range(repeats)])

    def rollout(self, batch: AnchorBatch) -> RolloutBatch:
        # each group's prompt is its paired data item's caption (the released recipe)
        # the prompts are the captions, each repeated G times in order
        group = self.config.algo.group_size
        encode = self.encode_text if batch.text is None else (lambda _: self.batch_text(batch, group))
        velocity = self.reference_velocity if self.config.rollout.from_reference else self.velocity
        return generate_rollouts(velocity, encode, self.vae.decode,
                                 TimedRewards(self.rewards, self.timer),
                                 batch.captions, self.latent_shape, self.sigmas, self.config.sampler,
                                 self.config.algo, self.config.run.seed, self.step,
                                 self.prompt_slice.start, self.device, self.log_prob_fn)

    def step_plan(self):
        """This iteration's trained steps and data-term counts (algo/steps.py: the one rule)."""
        return step_plan(self.config.algo, self.config.sampler.num_steps, self.config.run.seed, self.step)

    def trained_steps(self) -> list[int]:
        return list(self.step_plan().steps)

    def drop_captions(self, text: torch.Tensor, items: list[int], index: int) -> torch.Tensor:
        """algo.data_caption_dropout: each data-term sample's caption embedding replaced by the empty
        prompt's with that probability, keyed by (seed, step, trained step, item)."""
        rate = self.config.algo.data_caption_dropout
        if rate == 0:
            return text
        draws = keyed_normal((), items, self.config.run.seed, CAPTION_DROP, self.step, index,
                             device=self.device)
        dropped = torch.special.ndtr(draws) < rate  # a uniform draw below the rate
        empty = self.encode_text([""]).to(text.dtype)
        return torch.where(dropped.reshape(-1, 1, 1), empty, text)

    def data_loss(self, batch: AnchorBatch, rollouts: RolloutBatch, index: int) -> torch.Tensor:
        """Flow-matching loss of the policy on the anchor batch: (B_data,), or under
        algo.preset=release (P * G,), every rollout sample on its group's anchor x0 with its own
        initial noise and text (cosmos-rl wfm_trainer.py, `use_rl_sigma_and_noise`)."""
        settings, x0 = self.config.algo, batch.latents.to(self.device)
        release = settings.preset == "release"
        if release:
            x0 = x0.repeat_interleave(settings.group_size, dim=0)
        if settings.data_reuse_rollout_noise:
            noise = rollouts.trajectory.initial_noise
            noise = noise if release else noise[:: settings.group_size]
            sigma = torch.full((x0.shape[0],), float(rollouts.trajectory.sigmas[index]),
                               device=self.device)
        else:
            items = list(range(self.prompt_slice.start, self.prompt_slice.start + x0.shape[0]))
            noise, sigma = data_term_draws(x0.shape[1:], items, self.config.run.seed, self.step,
                                           index, device=self.device)
        first = self.prompt_slice.start * (settings.group_size if release else 1)
        text = self.drop_captions(rollouts.text if release else self.batch_text(batch),
                                  list(range(first, first + x0.shape[0])), index)
        with self.timer.phase("forward"):
            v_pred = self.engine.forward(add_noise(x0, noise, sigma), sigma, text)
        return kernels.flow_matching_loss(v_pred, x0, noise, data_loss_weight(sigma, algo=settings),
                                          backend=self.kernel_backend)

    def optimize(self, batch: AnchorBatch, rollouts: RolloutBatch) -> dict[str, float]:
        """Accumulate the DDRL loss over the trained denoising steps, then one optimizer step."""
        settings, trajectory = self.config.algo, rollouts.trajectory
        plan, totals = self.step_plan(), {}
        steps = plan.steps
        for position, index in enumerate(steps):
            # each state's own noise level (the schedule, or edm_ab2's churned levels)
            x, sigma = trajectory.states[index], float(trajectory.sigmas[index])
            sigma_next = float(trajectory.sigmas[index + 1])
            with self.timer.phase("forward"):
                v = self.engine.forward(x, torch.full((x.shape[0],), sigma, device=self.device),
                                        rollouts.text)
            kl, noise_level = None, self.config.sampler.noise_level
            if self.edm_schedule is not None:  # the release sampler's transition, as it scored it
                log_prob, _, std = edm_training_log_prob(v, trajectory, index, self.edm_schedule,
                                                         self.config.sampler.s_noise)
            elif self.reference is None:  # the fused log-prob; the same kernel scored the rollout
                log_prob, std = kernels.sde_log_prob(v, x, trajectory.states[index + 1], sigma, sigma_next,
                                                     noise_level, backend=self.kernel_backend,
                                                     return_std=True)
            else:
                log_prob, mean, std = kernels.sde_log_prob(
                    v, x, trajectory.states[index + 1], sigma, sigma_next, noise_level,
                    backend=self.kernel_backend, return_mean=True, return_std=True)
                # same precision and kernel as the policy, so the KL is exactly 0 while the weights agree
                with torch.no_grad(), autocast(self.device, self.config.run.dtype):
                    ref_v = self.reference(x, torch.full_like(log_prob, sigma), rollouts.text)
                    # only the reference's transition mean is needed; prev_sample = x is a placeholder
                    _, ref_mean = kernels.sde_log_prob(ref_v, x, x, sigma, sigma_next, noise_level,
                                                       backend=self.kernel_backend, return_mean=True)
                kl = kl_penalty(mean, ref_mean, std, sigma, sigma_next, algo=settings)
            wants_data = position in plan.data_positions
            old_log_prob = trajectory.log_probs[index]
            loss, stats = self.loss_fn(
                log_prob=log_prob, old_log_prob=old_log_prob,
                log_ratio=policy_log_ratio(log_prob, old_log_prob, std, algo=settings),
                advantages=rollouts.advantages, clip_eps=settings.clip_eps,
                policy_weight=settings.policy_weight, data_beta=settings.data_beta if wants_data else 0.0,
                kl_beta=settings.kl_beta, loss_scale=settings.loss_scale,
                data_loss=self.data_loss(batch, rollouts, index) if wants_data else None, kl=kl)
            with self.timer.phase("backward"):
                self.engine.backward(loss / len(steps))
            for key, value in stats.items():
                totals.setdefault(key, []).append(float(value))
        metrics = {key: sum(values) / len(values) for key, values in totals.items()}
        metrics["ratio_max_dev"] = max(totals["ratio_max_dev"])
        with self.timer.phase("optimizer"):
            metrics["grad_norm"] = self.engine.step()
        if self.config.optim.force_finite_grads:  # elements zeroed, the most on any rank
            metrics["grad_nonfinite_max"] = float(self.engine.nonfinite)
        return metrics

    def run_evaluation(self, label: str = "evaluation") -> EvalResult:
        """label: the name of its progress bar (rank 0, with train.progress)."""
        train = self.config.train
        return evaluate(self.velocity, self.encode_text, self.vae.decode, self.rewards,
                        eval_prompts(self.config), train.eval_samples_per_prompt, self.latent_shape,
                        self.sigmas, train.eval_seed, self.device,
                        progress=label if train.progress and self.world.is_main else "")

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        # the loader as it was before the oldest batch not yet trained on: a resumed run reads
        # (and orders rollouts for) the read-ahead batches again
        loader = self.pending[0][2] if self.pending else self.loader.state_dict()
        if self.sharded_data:  # every rank's own position, gathered (a collective)
            check_object_device("all_gather_object(loader state)", self.world)
            loader = gather_state(self.loader, loader)
        trainer_state = {"loader": loader,
                         "dit_config": json.dumps(self.engine.model.config.to_dict())}
        if self.config.algo.update_ref_every:  # no longer the starting weights: keep it
            trainer_state["reference"] = {name: p.detach().cpu()
                                          for name, p in self.reference.named_parameters()}
        return save_checkpoint(self.run_dir, self.step, self.engine, trainer_state, self.world,
                               self.config.train.keep_last)

    def maybe_resume(self) -> None:
        setting = self.config.train.resume
        path = latest_checkpoint(self.run_dir) if setting == "auto" else (
            None if setting == "none" else Path(setting))
        if path is None:
            return
        state = load_checkpoint(path, self.engine, self.world)
        self.loader.load_state_dict(state["loader"])
        if self.config.algo.update_ref_every:
            if "reference" not in state:
                raise ConfigError(f"config key 'algo.update_ref_every': the checkpoint '{path}' holds "
                                  f"no reference weights (written with update_ref_every=0)")
            self.reference.load_state_dict(state["reference"])
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)

    # -- the loop -------------------------------------------------------------------------------
    def fill_pipeline(self) -> None:
        """Read anchor batches, and order their rollouts, as far ahead as the policy lag allows."""
        ahead = self.remote.ahead if self.remote is not None else 0
        while not self.pending or (len(self.pending) <= ahead
                                   and self.step + len(self.pending) < self.config.train.steps):
            state, batch = self.loader.state_dict(), self.next_batch()
            step = self.step + len(self.pending)
            self.pending.append((step, batch, state))
            if self.remote is not None:
                self.remote.request(step, batch)

    def iteration(self) -> dict[str, float]:
        timer = self.timer
        timer.start_step()
        with timer.phase("data"):
            self.fill_pipeline()
            step, batch, _ = self.pending.popleft()
        with timer.phase("rollout"):  # disaggregated: the wait for the rollout ranks' trajectories
            if self.remote is None:
                rollouts, metrics = self.rollout(batch), {}
            else:
                rollouts, metrics = self.remote.receive(step, batch)
        metrics.update(self.optimize(batch, rollouts))
        self.step += 1
        every = self.config.algo.update_ref_every
        if every and self.step % every == 0:
            self.update_reference()
        if self.remote is not None:
            with timer.phase("publish"):
                self.remote.after_step(self.step)
        timing = timer.step_metrics()
        if self.remote is not None:
            metrics["trainer_idle_fraction"] = timing["time_rollout"] / timing["time_step"]
        rewards = rollouts.total_reward
        metrics.update(
            reward_mean=rewards.mean().item(), reward_square_mean=rewards.square().mean().item(),
            advantage_abs_mean=rollouts.advantages.abs().mean().item(), lr=self.engine.lr, **timing,
            time_train=sum(timing.get(f"time_{name}", 0.0) for name in ("forward", "backward", "optimizer")),
            **step_throughput(self.config, timing["time_step"], self.peak_flops,
                              self.world.world_size, self.engine.model.config),
            **reward_metrics(rollouts.rewards))
        # means over ranks are global means (equal shares); the std is rebuilt from E[r^2] - E[r]^2
        metrics = reduce_metrics(metrics, self.world)
        num_samples = len(rollouts.prompts) * self.world.world_size // self.model_parallel
        variance = max(0.0, metrics.pop("reward_square_mean") - metrics["reward_mean"] ** 2)
        metrics["reward_std"] = (variance * num_samples / max(1, num_samples - 1)) ** 0.5
        # counters are the same on every rank and stay integers
        skipped = self.loader.skipped
        if self.sharded_data:  # each rank counts what it read itself
            mean = reduce_metrics({"skipped": skipped}, self.world)["skipped"]
            skipped = round(mean * self.world.world_size / self.model_parallel)
        return {"step": self.step, "policy_version": rollouts.policy_version,
                "anchor_samples_skipped": skipped, **metrics}

    def train(self) -> bool:
        """Run optimizer steps until train.steps, then save. Returns False if a preemption request
        (SIGUSR1 or RUN_DIR/.preempt_requested) stopped it early, after checkpointing that step."""
        config, main = self.config, self.world.is_main
        if main:
            save_config(config, self.run_dir)
        stop = StopRequest(self.run_dir, self.world)
        writer = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step=self.step) if main else None
        progress = StepProgress(config.train.steps, self.step, config.train.progress and main,
                                self.kernel_backend)
        interval = config.train.telemetry_interval_s
        telemetry = (TelemetrySampler(interval, gpus=self.device.type == "cuda").start()
                     if main and interval > 0 else None)  # a CPU run does not look for NVML
        finished = True
        if self.remote is not None:
            self.remote.publish(self.step)  # the rollout ranks start from the trainers' weights
        while self.step < config.train.steps:
            metrics = self.iteration()
            logged = self.step % config.train.log_every == 0 or self.step == config.train.steps
            if writer is not None and logged:
                metrics = {**metrics, **(telemetry.snapshot() if telemetry else {})}
                writer.write(metrics)
                self.loggers.log_metrics(metrics, self.step)
            progress.step(reward=f"{metrics['reward_mean']:.3f}",
                          data=f"{metrics.get('data_loss', float('nan')):.3f}")
            if config.train.save_every and self.step % config.train.save_every == 0:
                with self.timer.phase("checkpoint"):  # counted in the next step's metrics
                    self.save()
            if self.step < config.train.steps and stop.requested():
                logger.warning("%s: checkpointing step %d and stopping", stop.reason, self.step)
                finished = False
                break
        progress.close()
        if telemetry is not None:
            telemetry.stop()
        if self.remote is not None:
            self.remote.close()
        if writer is not None:
            writer.close()
        if latest_checkpoint(self.run_dir) != self.run_dir / "checkpoints" / f"step_{self.step:06d}":
            self.save()
        if finished and main:  # a warning that came during the last step needs no requeue
            stop.path.unlink(missing_ok=True)
        return finished
