"""Typed run configuration: one dataclass per component, the defaults are the CPU demo.

Every stage of the data flow in docs/architecture.md reads its own section: `data` the anchor
loader, `model` the DiT, `sampler` the rollouts, `rewards` the scoring, `algo` the DDRL loss,
`optim` the optimizer step, `train` the loop. Loading and validation live in `config.loader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


def _check(condition: bool, key: str, expected: str, value: object) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


@dataclass
class RunSection:
    name: str = "demo"
    output_dir: str = "outputs/demo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast on CUDA and CPU)
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda"), "run.device", "auto|cpu|cuda", self.device)
        _check(self.dtype in ("fp32", "bf16"), "run.dtype", "fp32|bf16", self.dtype)
        _check(self.num_threads >= 0, "run.num_threads", ">= 0", self.num_threads)


@dataclass
class VideoSection:
    """Shape of one video in latent space: (channels, frames, height, width)."""

    channels: int = 3
    num_frames: int = 8
    height: int = 16
    width: int = 16

    def __post_init__(self) -> None:
        for key in ("channels", "num_frames", "height", "width"):
            _check(getattr(self, key) > 0, f"video.{key}", "> 0", getattr(self, key))


@dataclass
class ModelSection:
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: list[int] = field(default_factory=lambda: [2, 2, 2])  # (frames, height, width)
    text_dim: int = 32
    max_text_tokens: int = 12
    attention_backend: str = "auto"  # auto | sdpa | flash
    qk_norm: bool = True
    init_checkpoint: str = "builtin:base"  # builtin:base | path to .safetensors | none (random init)
    # --- model kind and diffusers adapters (models/wan.py); begin ---
    kind: str = "dit"  # dit (the built-in VideoDiT) | diffusers_wan (a diffusers WanTransformer3DModel)
    # diffusers_wan: local diffusers folder with transformer/ (optionally vae/, text_encoder/,
    # tokenizer/, scheduler/); read with from_pretrained, never from a hub
    pretrained: str = ""
    # diffusers_wan convention: the transformer gets timestep = sigma * timestep_scale (Wan: 1000),
    # and our velocity (noise - x0) = velocity_sign * its output (Wan predicts noise - x0: +1)
    timestep_scale: float = 1000.0
    velocity_sign: float = 1.0
    text_encoder: str = "auto"  # diffusers_wan: auto (text_encoder/ if any, else hash) | hash | pretrained
    vae: str = "auto"  # diffusers_wan: auto (vae/ if present, else pixel) | pixel | pretrained
    # --- model kind and diffusers adapters; end ---

    def __post_init__(self) -> None:
        _check(self.kind in ("dit", "diffusers_wan"), "model.kind", "dit|diffusers_wan", self.kind)
        _check(self.kind != "diffusers_wan" or self.pretrained.strip() != "", "model.pretrained",
               "a local diffusers folder when model.kind=diffusers_wan", self.pretrained)
        _check(math.isfinite(self.timestep_scale) and self.timestep_scale > 0, "model.timestep_scale",
               "a float > 0", self.timestep_scale)
        _check(self.velocity_sign in (1.0, -1.0), "model.velocity_sign", "1 or -1", self.velocity_sign)
        _check(self.text_encoder in ("auto", "hash", "pretrained"), "model.text_encoder",
               "auto|hash|pretrained", self.text_encoder)
        _check(self.vae in ("auto", "pixel", "pretrained"), "model.vae", "auto|pixel|pretrained", self.vae)
        _check(self.num_heads >= 1, "model.num_heads", ">= 1", self.num_heads)
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
               f"a multiple of model.num_heads={self.num_heads}", self.hidden_size)
        head_dim = self.hidden_size // self.num_heads
        _check(head_dim % 2 == 0 and head_dim >= 6, "model.hidden_size",
               "hidden_size / num_heads even and >= 6 (3D rotary embeddings)", self.hidden_size)
        _check(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size),
               "model.patch_size", "three positive ints [frames, height, width]", self.patch_size)
        _check(self.attention_backend in ("auto", "sdpa", "flash"), "model.attention_backend",
               "auto|sdpa|flash", self.attention_backend)


@dataclass
class DataSection:
    shards: str = ""  # brace/glob pattern or folder of .tar; "" = generate the demo shards
    generated_dir: str = "outputs/data/demo_shards"
    num_generated: int = 2048
    samples_per_shard: int = 256
    shuffle_buffer: int = 256  # replicated: shuffle buffer; sharded: each reader's shuffle window
    # replicated: every rank reads the global batch (same samples for any world size, small data);
    # sharded: each data-parallel rank and worker reads its own part, each sample once per epoch
    split: str = "replicated"
    num_workers: int = 0  # sharded: DataLoader worker processes per rank
    prefetch: int = 16  # sharded: samples each worker reads ahead
    buckets: list[list[int]] = field(default_factory=list)  # sharded: allowed (C, T, H, W); [] = any
    index: str = ""  # sharded: index.json of prepared shards ("" = next to the shards, if any)
    latents_dtype: str = "fp32"  # sharded: fp32 | stored (keep the shards' fp16/bf16)

    def __post_init__(self) -> None:
        _check(self.split in ("replicated", "sharded"), "data.split", "replicated|sharded", self.split)
        _check(self.prefetch >= 1, "data.prefetch", ">= 1", self.prefetch)
        _check(self.latents_dtype in ("fp32", "stored"), "data.latents_dtype", "fp32|stored",
               self.latents_dtype)
        for shape in self.buckets:
            _check(len(shape) == 4 and all(d > 0 for d in shape), "data.buckets",
                   "a list of [C, T, H, W] shapes", self.buckets)
        _check(self.num_generated > 0, "data.num_generated", "> 0", self.num_generated)
        _check(self.samples_per_shard > 0, "data.samples_per_shard", "> 0", self.samples_per_shard)
        _check(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)


@dataclass
class SamplerSection:
    num_steps: int = 10
    shift: float = 1.0  # timestep shift s: t' = s t / (1 + (s - 1) t)
    noise_level: float = 0.7  # Flow-GRPO SDE noise level a
    # rollouts: sde (Flow-GRPO's SDE) | edm_ab2 (the authors' release: EDM churn + Adams-Bashforth,
    # algo/edm.py); ode has no log-probs (evaluation only)
    kind: str = "sde"
    # edm_ab2 (the release's defaults, cosmos_rl/policy/config/wfm): churn, its noise and range
    s_churn: float = 1.0
    s_noise: float = 1.0
    s_t_min: float = 0.0
    s_t_max: float = 1.0e30
    edm_sigma_min: float = 0.002
    edm_sigma_max: float = 80.0
    edm_rho: float = 7.0

    def __post_init__(self) -> None:
        _check(self.num_steps >= 1, "sampler.num_steps", ">= 1", self.num_steps)
        _check(self.shift > 0, "sampler.shift", "> 0", self.shift)
        _check(self.noise_level > 0, "sampler.noise_level", "> 0", self.noise_level)
        _check(self.kind in ("sde", "ode", "edm_ab2"), "sampler.kind", "sde|ode|edm_ab2", self.kind)
        for key in ("s_churn", "s_noise", "s_t_min"):
            _check(getattr(self, key) >= 0, f"sampler.{key}", ">= 0", getattr(self, key))
        _check(0 < self.edm_sigma_min < self.edm_sigma_max, "sampler.edm_sigma_min",
               f"0 < edm_sigma_min < edm_sigma_max = {self.edm_sigma_max}", self.edm_sigma_min)
        _check(self.edm_rho > 0, "sampler.edm_rho", "> 0", self.edm_rho)


@dataclass
class RewardSpec:
    name: str = "caption_alignment"
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # the reward's keyword arguments
    scale: float = 1.0  # each score x scale, after the clip (the release's per-reward `scale`)
    clip: list[float] = field(default_factory=list)  # [low, high]: scores clamped first; [] = off

    def __post_init__(self) -> None:
        _check(math.isfinite(self.scale), f"rewards[{self.name}].scale", "a finite float", self.scale)
        _check(not self.clip or (len(self.clip) == 2 and self.clip[0] < self.clip[1]),
               f"rewards[{self.name}].clip", "[] or [low, high] with low < high", self.clip)


@dataclass
class AlgoSection:
    """DDRL loss; Flow-GRPO is data_beta=0, kl_beta>0; SFT is policy_weight=0."""

    name: str = "ddrl"  # registered loss function
    # paper (Flow-GRPO's quantities) | release (the authors' cosmos-rl code): the advantages' group
    # std, the policy log-ratio, the data term's weight, noise and samples, the KL scale (README)
    preset: str = "paper"
    group_size: int = 4  # G samples per prompt
    prompts_per_step: int = 4
    train_timestep_stride: int = 2  # train on every k-th sampling step (release: 2)
    train_timestep_offset: int = 0  # first trained step index (release: even indices)
    clip_eps: float = 1e-4
    policy_weight: float = 1.0
    data_beta: float = 0.01
    kl_beta: float = 0.0
    loss_scale: float = 10.0
    advantage_clamp: float = 5.0
    exp_reward: bool = False  # A <- -exp(-A)
    same_noise_per_group: bool = False
    data_reuse_rollout_noise: bool = False  # data term at the rollout's sigma_i and initial noise
    # data term once per iteration, on the first trained step (like every term, it is divided by
    # the number of trained steps, so its weight per iteration is data_beta / trained steps)
    data_on_first_only: bool = False
    # the release's train_on entries of -1: this many more trained steps per iteration, drawn
    # without replacement from the steps the stride leaves out, keyed by (run.seed, step)
    train_random_steps: int = 0
    # probability that a data-term sample's caption is replaced by the empty prompt (release: 0.2)
    data_caption_dropout: float = 0.0
    # copy the policy into the reference (KL and rollout.from_reference) every k steps; 0 = never
    # (the release's update_ref_every_iter)
    update_ref_every: int = 0

    def __post_init__(self) -> None:
        _check(self.preset in ("paper", "release"), "algo.preset", "paper|release", self.preset)
        if self.preset == "release":  # the release's data term always reuses the rollout noise
            self.data_reuse_rollout_noise = True
        _check(self.group_size >= 2, "algo.group_size", ">= 2 (advantages are group-normalised)",
               self.group_size)
        _check(self.prompts_per_step >= 1, "algo.prompts_per_step", ">= 1", self.prompts_per_step)
        _check(self.train_timestep_stride >= 1, "algo.train_timestep_stride", ">= 1",
               self.train_timestep_stride)
        _check(self.train_timestep_offset >= 0, "algo.train_timestep_offset", ">= 0",
               self.train_timestep_offset)
        _check(self.clip_eps > 0, "algo.clip_eps", "> 0", self.clip_eps)
        _check(self.train_random_steps >= 0, "algo.train_random_steps", ">= 0", self.train_random_steps)
        _check(self.update_ref_every >= 0, "algo.update_ref_every", ">= 0", self.update_ref_every)
        _check(0 <= self.data_caption_dropout < 1, "algo.data_caption_dropout", "in [0, 1)",
               self.data_caption_dropout)
        for key in ("policy_weight", "data_beta", "kl_beta", "loss_scale", "advantage_clamp"):
            value = getattr(self, key)
            _check(math.isfinite(value) and value >= 0, f"algo.{key}", "a finite value >= 0", value)
        _check(self.policy_weight + self.data_beta + self.kl_beta > 0, "algo.policy_weight",
               "some loss term on (policy_weight, data_beta or kl_beta > 0)", self.policy_weight)


@dataclass
class OptimSection:
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    warmup_steps: int = 0
    decay_steps: int = 0  # > 0: cosine decay of the learning rate to 0 at this step; 0 = constant
    grad_clip: float = 1.0
    ema_decay: float = 0.95  # ema_kind=constant: the decay per step; 0 turns EMA off
    # constant | power (EDM2's power EMA, the release's: decay (1 - 1/(it+1))^(gamma+1), gamma set
    # by the relative width ema_rate; parallel/ema.py)
    ema_kind: str = "constant"
    ema_rate: float = 0.1  # ema_kind=power: sigma_rel (the release's ema.rate)
    # zero the non-finite gradient elements before clipping, counted in grad_nonfinite (the
    # release's grad_clip force_finite)
    force_finite_grads: bool = False

    def __post_init__(self) -> None:
        _check(math.isfinite(self.lr) and self.lr > 0, "optim.lr", "a float > 0", self.lr)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "two floats in [0, 1)", self.betas)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        _check(self.decay_steps >= 0, "optim.decay_steps", ">= 0 (0 = no decay)", self.decay_steps)
        _check(self.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 = off)", self.grad_clip)
        _check(0 <= self.ema_decay < 1, "optim.ema_decay", "in [0, 1)", self.ema_decay)
        _check(self.ema_kind in ("constant", "power"), "optim.ema_kind", "constant|power", self.ema_kind)
        _check(0 < self.ema_rate < 0.28, "optim.ema_rate", "in (0, 0.28) (EDM2's sigma_rel)",
               self.ema_rate)


@dataclass
class TrainSection:
    steps: int = 40  # optimizer steps (one per DDRL iteration)
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    eval_prompts: int = 16  # held-out prompts for the before/after evaluation; 0 = no evaluation
    eval_prompts_file: str = ""  # one prompt per line; "" = draw them from the demo generator
    eval_samples_per_prompt: int = 2
    eval_seed: int = 1234  # fixes the eval prompts and the initial noise, the same before and after
    resume: str = "auto"  # auto (latest checkpoint of run.output_dir, if any) | none | a checkpoint dir
    progress: bool = True
    telemetry_interval_s: float = 5.0  # GPU (NVML) or CPU (psutil) sampling into the metrics; 0 = off
    tensorboard: bool = False  # TensorBoard events (scalars, before/after samples) in RUN_DIR/tensorboard
    wandb_project: str = ""  # Weights & Biases project; "" = off (WANDB_MODE is honoured)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", ">= 0", self.steps)
        _check(self.telemetry_interval_s >= 0, "train.telemetry_interval_s", ">= 0",
               self.telemetry_interval_s)
        _check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        _check(self.save_every >= 0, "train.save_every", ">= 0", self.save_every)
        _check(self.keep_last >= 1, "train.keep_last", ">= 1", self.keep_last)
        _check(self.eval_prompts >= 0, "train.eval_prompts", ">= 0", self.eval_prompts)
        _check(self.eval_samples_per_prompt >= 1, "train.eval_samples_per_prompt", ">= 1",
               self.eval_samples_per_prompt)


@dataclass
class PretrainSection:
    """`ddrl pretrain`: the flow-matching run that makes the shipped base checkpoint."""

    steps: int = 2000
    batch_size: int = 32  # global: split over the data-parallel ranks
    lr: float = 1e-3  # peak; warm-up over min(200, steps / 10) steps, then cosine decay to 0
    ema_decay: float = 0.999  # the saved weights are this EMA
    save_every: int = 0  # checkpoints into <output's folder>/checkpoints; 0 = only at the end
    output: str = "outputs/pretrain/base.safetensors"

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "pretrain.steps", ">= 1", self.steps)
        _check(self.batch_size >= 1, "pretrain.batch_size", ">= 1", self.batch_size)
        _check(0 < self.ema_decay < 1, "pretrain.ema_decay", "in (0, 1)", self.ema_decay)


@dataclass
class ParallelSection:
    engine: str = "none"  # none (one process) | fsdp2 | deepspeed | megatron
    dp_replicate: int = 1  # HSDP: replicas of the FSDP shard group (1 = plain FSDP)
    cp: int = 1  # context parallel: ranks sharing one sample's video tokens (Ulysses)
    tp: int = 1  # megatron: tensor-parallel ranks (attention heads and MLP split)
    activation_checkpointing: bool = False
    compile_blocks: bool = False  # torch.compile each DiT block
    timeout_s: float = 600.0  # every collective; a hang ends with an error naming rank and operation
    zero_stage: int = 2  # deepspeed: ZeRO stage 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state and step on the CPU
    deepspeed_config: str = ""  # deepspeed: a JSON file merged over the generated config

    def __post_init__(self) -> None:
        _check(self.engine in ("none", "fsdp2", "deepspeed", "megatron"), "parallel.engine",
               "none|fsdp2|deepspeed|megatron", self.engine)
        _check(self.tp >= 1, "parallel.tp", ">= 1", self.tp)
        _check(self.tp == 1 or self.engine == "megatron", "parallel.tp",
               "1 unless parallel.engine=megatron", self.tp)
        _check(self.zero_stage in (2, 3), "parallel.zero_stage", "2 or 3", self.zero_stage)
        _check(self.dp_replicate >= 1, "parallel.dp_replicate", ">= 1", self.dp_replicate)
        _check(self.cp >= 1, "parallel.cp", ">= 1", self.cp)
        _check(self.cp == 1 or self.engine == "fsdp2", "parallel.cp",
               "1 unless parallel.engine=fsdp2", self.cp)
        _check(self.timeout_s > 0, "parallel.timeout_s", "> 0", self.timeout_s)


@dataclass
class KernelsSection:
    """Fused per-element kernels of the losses (kernels/, `ddrl_scale.kernels`)."""

    # auto: Triton on CUDA, the torch.compile'd fused path on CPU; torch: the eager references
    backend: str = "auto"  # auto | torch | compile | triton | cuda

    def __post_init__(self) -> None:
        _check(self.backend in ("auto", "torch", "compile", "triton", "cuda"), "kernels.backend",
               "auto|torch|compile|triton|cuda", self.backend)


@dataclass
class RolloutSection:
    """Where rollouts run: in the trainer's processes, or on rollout ranks of their own."""

    mode: str = "colocated"  # colocated | disaggregated (the last num_ranks ranks sample)
    num_ranks: int = 1  # disaggregated: rollout ranks (the others train)
    tp_size: int = 1  # disaggregated: rollout ranks per tensor-parallel inference copy (model.kind=dit)
    max_policy_lag: int = 0  # 0 = on-policy and synchronous; k = rollouts of up to k versions back
    sync_every: int = 1  # publish the weights every k optimizer steps (<= max_policy_lag + 1)
    publish_bucket_mb: float = 256.0  # weights stream to rollout ranks in buckets of this size
    verify_publish: bool = False  # checksum the rollout ranks' weights against the trainers' each step
    timeout_s: float = 1800.0  # a trainer waits this long for a rollout rank (it for orders: + parallel's)
    # sample the rollouts with the reference model, not the policy (the release's on_policy=false)
    from_reference: bool = False

    def __post_init__(self) -> None:
        _check(self.mode in ("colocated", "disaggregated"), "rollout.mode", "colocated|disaggregated",
               self.mode)
        _check(self.num_ranks >= 1, "rollout.num_ranks", ">= 1", self.num_ranks)
        # colocated: num_ranks is unused (launch.rollout_nodes sets it when it places the roles)
        _check(self.tp_size >= 1 and (self.mode == "colocated" or self.num_ranks % self.tp_size == 0),
               "rollout.tp_size", f">= 1 and a divisor of rollout.num_ranks={self.num_ranks}", self.tp_size)
        _check(self.max_policy_lag >= 0, "rollout.max_policy_lag", ">= 0", self.max_policy_lag)
        _check(self.mode == "disaggregated" or self.max_policy_lag == 0, "rollout.max_policy_lag",
               "0 when rollout.mode=colocated (colocated rollouts are always on-policy)",
               self.max_policy_lag)
        _check(1 <= self.sync_every <= self.max_policy_lag + 1, "rollout.sync_every",
               f"between 1 and rollout.max_policy_lag + 1 = {self.max_policy_lag + 1} (a rollout "
               f"may not use weights older than the lag allows)", self.sync_every)
        _check(self.publish_bucket_mb > 0, "rollout.publish_bucket_mb", "> 0", self.publish_bucket_mb)
        _check(self.timeout_s > 0, "rollout.timeout_s", "> 0", self.timeout_s)


@dataclass
class LaunchSection:
    """`ddrl launch slurm`: how the job is asked of SLURM (rendered into the sbatch script)."""

    nodes: int = 1
    nproc_per_node: int = 1  # processes (ranks) per node; GPUs per node on GPU clusters
    gpus_per_node: int = 0  # --gres=gpu:N (0 = no GRES request)
    cpus_per_node: int = 0  # --cpus-per-task (0 = SLURM's default)
    mem: str = ""  # --mem, for example 200G ("" = SLURM's default)
    time: str = "01:00:00"
    job_name: str = "ddrl"
    partition: str = ""
    account: str = ""
    qos: str = ""
    container_image: str = ""  # pyxis --container-image
    container_mounts: str = ""  # pyxis --container-mounts
    log_dir: str = "outputs/slurm_logs"
    port: int = 29500  # torch rendezvous port on the head node
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit: checkpoint and requeue
    requeue: bool = True  # requeue after a preemption warning (never after a failure)
    rollout_nodes: int = 0  # the last N training nodes run rollout ranks (sets rollout.mode/num_ranks)
    reward_nodes: int = 0  # 1 = the job's last node hosts `ddrl reward-serve` (no training ranks)
    reward_args: str = ""  # reward-serve arguments on the reward node, e.g. "--reward pkg.mod:Class"
    reward_port: int = 8400  # the reward node's port; training ranks get $DDRL_REWARD_URL
    env: dict[str, str] = field(default_factory=dict)  # extra environment, for example NCCL_*

    def __post_init__(self) -> None:
        _check(self.nodes >= 1, "launch.nodes", ">= 1", self.nodes)
        _check(self.nproc_per_node >= 1, "launch.nproc_per_node", ">= 1", self.nproc_per_node)
        _check(self.gpus_per_node >= 0, "launch.gpus_per_node", ">= 0", self.gpus_per_node)
        _check(self.signal_seconds >= 0, "launch.signal_seconds", ">= 0", self.signal_seconds)
        _check(0 < self.port < 65536, "launch.port", "a TCP port", self.port)
        _check(self.reward_nodes in (0, 1), "launch.reward_nodes", "0 or 1", self.reward_nodes)
        _check(self.reward_nodes == 0 or self.reward_args.strip() != "", "launch.reward_args",
               "the reward-serve arguments (--reward module:Class ...) when launch.reward_nodes=1",
               self.reward_args)
        _check(0 < self.reward_port < 65536, "launch.reward_port", "a TCP port", self.reward_port)
        _check(0 <= self.rollout_nodes < self.nodes - self.reward_nodes, "launch.rollout_nodes",
               f"0 <= rollout_nodes < launch.nodes - launch.reward_nodes = "
               f"{self.nodes - self.reward_nodes} (some node must train)", self.rollout_nodes)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    video: VideoSection = field(default_factory=VideoSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("caption_alignment", 1.0), RewardSpec("saturation", 1.0)]
    )
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    launch: LaunchSection = field(default_factory=LaunchSection)

    def __post_init__(self) -> None:
        _check(len(self.rewards) > 0, "rewards", "at least one reward", self.rewards)
        for dim, patch, key in zip(
            (self.video.num_frames, self.video.height, self.video.width),
            self.model.patch_size, ("num_frames", "height", "width"),
        ):
            _check(dim % patch == 0, f"video.{key}",
                   f"a multiple of the model patch size {patch}", dim)
        if self.rollout.mode == "disaggregated":
            copies = self.rollout.num_ranks // self.rollout.tp_size
            _check(self.algo.prompts_per_step % copies == 0, "algo.prompts_per_step",
                   f"a multiple of rollout.num_ranks / rollout.tp_size = {copies} (each rollout copy "
                   f"samples whole prompt groups)", self.algo.prompts_per_step)
        _check(self.rollout.tp_size == 1 or self.model.kind == "dit", "rollout.tp_size",
               "1 unless model.kind=dit (tensor-parallel rollout copies are built for the VideoDiT)",
               self.rollout.tp_size)
        _check(not self.rollout.from_reference or self.rollout.mode == "colocated",
               "rollout.from_reference", "false with rollout.mode=disaggregated (rollout ranks hold "
               "the published policy)", self.rollout.from_reference)
        _check(not self.algo.update_ref_every or self.algo.kl_beta > 0 or self.rollout.from_reference,
               "algo.update_ref_every", "0 unless algo.kl_beta > 0 or rollout.from_reference (nothing "
               "else uses the reference)", self.algo.update_ref_every)
        _check(not self.optim.force_finite_grads or self.parallel.engine != "deepspeed",
               "optim.force_finite_grads", "false with parallel.engine=deepspeed (DeepSpeed steps "
               "inside its own backward, before the engine sees the gradients)",
               self.optim.force_finite_grads)
        if self.sampler.kind == "edm_ab2":  # what the release sampler is built for so far
            _check(self.rollout.mode == "colocated", "rollout.mode",
                   "colocated with sampler.kind=edm_ab2 (its x0 predictions are not sent by rollout "
                   "ranks yet)", self.rollout.mode)
            _check(self.algo.kl_beta == 0, "algo.kl_beta",
                   "0 with sampler.kind=edm_ab2 (the release recipe has no KL term)", self.algo.kl_beta)


def check_run_plan(config: RunConfig, world_size: int) -> None:
    """The checks that need the job's size, in one pass at start, before any model is built: the
    parallel plan over the `world_size` trainer ranks and the reward names. Raises ConfigError
    naming the key (the CLI prints it once, exit status 2)."""
    parallel = config.parallel
    model_parallel = parallel.cp * parallel.tp
    _check(model_parallel <= world_size and world_size % model_parallel == 0,
           "parallel.cp" if parallel.cp > 1 else "parallel.tp",
           f"parallel.cp x parallel.tp = {parallel.cp} x {parallel.tp} to divide the {world_size} "
           f"trainer ranks", parallel.cp if parallel.cp > 1 else parallel.tp)
    if parallel.engine == "fsdp2":
        _check(world_size % parallel.dp_replicate == 0, "parallel.dp_replicate",
               f"a divisor of the {world_size} trainer ranks", parallel.dp_replicate)
        _check(parallel.dp_replicate == 1 or parallel.cp == 1, "parallel.dp_replicate",
               "1 when parallel.cp > 1 (HSDP with context parallel is not supported)",
               parallel.dp_replicate)
    import ddrl_scale.rewards  # noqa: F401  (registers the built-in rewards)
    from ddrl_scale.rewards.base import available_rewards

    for index, reward in enumerate(config.rewards):
        _check(reward.name in available_rewards(), f"rewards.{index}.name",
               f"a registered reward, one of {available_rewards()}", reward.name)
