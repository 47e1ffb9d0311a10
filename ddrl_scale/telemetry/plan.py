"""`ddrl plan`: memory per GPU, communication per step, step time and MFU of parallel plans.

Given a DiT (layers, width, heads), a video shape, a DDRL iteration (prompts, group size, sampler
steps), a cluster (GPU type, GPUs per node, nodes) and the plans the framework's engines can run
(fsdp2: FSDP / HSDP shard groups, Ulysses context parallel, activation checkpointing; megatron:
tensor parallel x replicated data parallel; optional separate rollout ranks, whose inference
copies may be tensor parallel over `rollout.tp_size` ranks), it predicts what each plan costs,
rejects those that cannot run (naming why) and ranks the rest by step time.

The memory model counts what the framework's code keeps, per GPU (tested against measured peak
tensor memory of real CPU training steps in tests/test_plan.py):
- parameters, gradients (fp32), AdamW moments (2 x fp32), EMA (fp32), split over TP for the
  projections and sharded over the FSDP group; a Flow-GRPO KL reference is an unsharded fp32 copy;
- FSDP's all-gathered blocks (two in flight) and the unsharded root parameters;
- activations saved for backward per DiT block, counted from the block's code: ~24 x tokens x
  width + 2 x tokens x MLP width per sample (18 of the 24 and the MLP part split by TP), plus
  per-head and text terms; with activation checkpointing one block input per block, plus one
  block recomputed during backward;
- the rollout trajectory (sampler states and behaviour log-probs) and decoded videos kept for
  the loss;
- gradients alive during the forward when several denoising steps accumulate into one step.
A separate rollout rank's memory, the rollout rules and the choice of rollout TP are
`telemetry/plan_rollout.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ddrl_scale.algo.steps import step_plan
from ddrl_scale.config import RunConfig
from ddrl_scale.models import dit_config_from
from ddrl_scale.models.dit import DiTConfig
from ddrl_scale.telemetry.devices import DeviceSpec
from ddrl_scale.telemetry.flops import ddrl_iteration_flops

GB = 1e9
MEMORY_PARTS = ("parameters", "gradients", "optimizer", "ema", "reference", "buffers", "fsdp_gathered",
                "trajectory", "activations")


# -- what is computed -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One DDRL iteration of one model: shapes, batch and the FLOPs it needs (global)."""

    dit: DiTConfig
    prompts_per_step: int
    group_size: int
    sampler_steps: int
    trained_steps: int  # denoising steps trained per iteration (backward passes)
    data_forwards: int  # data-term forwards per iteration (0, 1 or trained_steps)
    data_samples: int  # global samples of one data-term forward (algo.steps.step_plan)
    kl_reference: bool  # Flow-GRPO's reverse KL keeps a frozen reference copy
    ema: bool
    dtype: str  # fp32 | bf16
    pixel_elements: int  # elements of one decoded video (what the rewards score)
    flops: dict[str, float] = field(default_factory=dict)  # rollout / policy / data, global

    @classmethod
    def from_config(cls, config: RunConfig, pixel_shape: tuple[int, ...] | None = None) -> Workload:
        """pixel_shape: a decoded video's (C, T, H, W); None = the latent shape (the pixel VAE)."""
        algo, steps = config.algo, config.sampler.num_steps
        step_rule = step_plan(algo, steps)
        video = config.video
        pixels = pixel_shape or (3, video.num_frames, video.height, video.width)
        return cls(dit=dit_config_from(config), prompts_per_step=algo.prompts_per_step,
                   group_size=algo.group_size, sampler_steps=steps,
                   trained_steps=len(step_rule.steps), data_forwards=step_rule.data_forwards,
                   data_samples=step_rule.data_samples, kl_reference=algo.kl_beta > 0,
                   ema=config.optim.ema_decay > 0,
                   dtype=config.run.dtype, pixel_elements=math.prod(pixels),
                   flops=ddrl_iteration_flops(config))

    @property
    def samples(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def latent_elements(self) -> int:
        dit = self.dit
        return dit.in_channels * dit.num_frames * dit.height * dit.width


def block_parameter_counts(dit: DiTConfig) -> tuple[int, int]:
    """(all, tensor-parallel split) parameters of one DiT block, counted from models/dit.py.

    Megatron splits q/k/v and the first MLP layer by output (weight and bias) and the attention
    outputs and second MLP layer by input (weight only); norms and adaLN stay whole.
    """
    d, m, head_dim = dit.hidden_size, dit.mlp_hidden, dit.hidden_size // dit.num_heads
    qk_norms = 2 * head_dim if dit.qk_norm else 0
    attention = 4 * (d * d + d) + qk_norms  # query, key, value, out (key/value from width d)
    total = 2 * attention + 2 * d + (d * m + m + m * d + d) + (d * 6 * d + 6 * d)  # + norm2 affine
    split = 2 * (3 * (d * d + d) + d * d) + (d * m + m) + m * d
    return total, split


def parameter_counts(dit: DiTConfig) -> tuple[int, int]:
    """(all, tensor-parallel split) parameters of the VideoDiT."""
    d, patch_in = dit.hidden_size, dit.in_channels * math.prod(dit.patch_size)
    block_total, block_split = block_parameter_counts(dit)
    outside = (patch_in * d + d) + 2 * (d * d + d) + (dit.text_dim * d + d + d * d + d) \
        + (d * 2 * d + 2 * d) + (d * patch_in + patch_in)
    return outside + dit.depth * block_total, dit.depth * block_split


# -- how it is spread -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelPlan:
    """trainers: ranks that train (the cluster's GPUs minus rollout_ranks). shard: FSDP shard group
    size (trainers / shard = HSDP replicas); TP runs on the megatron engine (no sharding).
    rollout_tp: rollout ranks per inference copy (rollout.tp_size); the copies split the prompts."""

    trainers: int
    tp: int = 1
    cp: int = 1
    shard: int = 1
    activation_checkpointing: bool = False
    rollout_ranks: int = 0
    rollout_tp: int = 1

    @property
    def rollout_copies(self) -> int:
        """Inference copies on the rollout ranks (0 when colocated): each samples its own prompts."""
        return self.rollout_ranks // self.rollout_tp

    @property
    def engine(self) -> str:
        return "megatron" if self.tp > 1 else "fsdp2"

    @property
    def data_parallel(self) -> int:
        """Ranks with different samples: trainers / (TP x CP)."""
        return self.trainers // (self.tp * self.cp)

    @property
    def replicate(self) -> int:
        return self.trainers // self.shard

    def describe(self) -> str:
        if self.tp > 1:
            parts = [f"TP{self.tp} x DP{self.data_parallel}"]
        else:
            sharding = (f"FSDP{self.shard}" if self.replicate == 1 else
                        f"DDP{self.trainers}" if self.shard == 1 else
                        f"HSDP {self.replicate}x{self.shard}")
            parts = [f"CP{self.cp} {sharding}" if self.cp > 1 else sharding]
        if self.activation_checkpointing:
            parts.append("+AC")
        if self.rollout_ranks:
            parts.append(f"+{self.rollout_ranks} rollout")
        if self.rollout_tp > 1:
            parts.append(f"(TP{self.rollout_tp})")
        return " ".join(parts)


@dataclass(frozen=True)
class Cluster:
    device: DeviceSpec
    gpus_per_node: int
    nodes: int

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def bandwidth(self, group_size: int, stride: int) -> tuple[float, str]:
        """Per-direction GB/s of a group of `group_size` ranks `stride` apart (ranks fill nodes in
        order): the NIC when the group spans nodes, else the intra-node link."""
        if group_size * stride > self.gpus_per_node:
            return self.device.inter_node_gb_s, "inter"
        return self.device.intra_node_gb_s, "intra"

    def rollout_copy_bandwidth(self, plan: ParallelPlan) -> tuple[float, str]:
        """Per-direction GB/s inside a rollout copy: the rollout ranks are the job's last ones and a
        copy is `rollout_tp` consecutive ranks, so a copy straddles nodes when the trainers (or the
        copy size) do not line up with the node boundaries."""
        for copy in range(plan.rollout_copies):
            first = plan.trainers + copy * plan.rollout_tp
            if first // self.gpus_per_node != (first + plan.rollout_tp - 1) // self.gpus_per_node:
                return self.device.inter_node_gb_s, "inter"
        return self.device.intra_node_gb_s, "intra"


@dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.5  # fraction of peak the DiT's matmuls reach
    comm_efficiency: float = 0.8  # fraction of link bandwidth collectives reach (large messages)
    usable_memory_fraction: float = 0.9  # the rest: CUDA context, NCCL buffers, fragmentation
    policy_lag: int = 0  # rollout.max_policy_lag: > 0 lets separate rollout ranks overlap training

    def describe(self, workload: Workload, cluster: Cluster) -> list[str]:
        device = cluster.device
        mode = "bf16" if workload.dtype == "bf16" else "fp32"
        return [
            f"device {device.name}: {device.memory_gb:.0f} GB, {mode} peak "
            f"{device.peak_flops[mode] / 1e12:.1f} TFLOP/s (dense), links: {device.intra_node_gb_s:g} "
            f"GB/s inside a node ({device.intra_node_link}), {device.inter_node_gb_s:g} GB/s between "
            f"nodes ({device.inter_node_link}), per GPU and direction",
            f"compute at {self.compute_efficiency:.0%} of peak; collectives at "
            f"{self.comm_efficiency:.0%} of link bandwidth (ring algorithms)",
            f"memory: {self.usable_memory_fraction:.0%} of the device is usable; fp32 master "
            "weights, gradients, AdamW moments and EMA, sharded by FSDP, split by TP",
            "activations: counted from the DiT block's saved tensors (eager PyTorch, fused "
            "attention; checked within 20% of measured CPU peaks); bf16 runs keep them in bf16 "
            "(CPU autocast keeps some in fp32: not modelled); each rank puts its whole share of "
            "the batch through one forward per trained step (the trainer has no micro-batches)",
            "FLOPs: the DiT's matmuls (elementwise work left out); TP and CP split them evenly "
            "(the few replicated layers are not counted twice); checkpointing adds a forward",
            "FSDP/HSDP/DP traffic overlaps compute (only the excess over compute time shows); "
            "TP and CP collectives and weight publishing are on the critical path",
            "FSDP gathers parameters for every forward (rollout steps included) and again in "
            "backward, and reduce-scatters gradients once per forward with grad",
            "separate rollout ranks hold a whole inference copy, or with rollout TP k (rollout."
            "tp_size) k consecutive rollout ranks hold one: q/k/v, attention-out and MLP "
            "projections split k ways (norms, embeddings, adaLN whole), 3 activation all-reduces "
            "per block and forward (self- and cross-attention out, MLP out) on the rollout side's "
            "critical path; each copy samples prompts_per_step / copies prompt groups; with policy "
            "lag 0 rollouts and training take turns, with lag > 0 they overlap (step = the slower "
            f"of the two) [lag {self.policy_lag}]",
            "ranks are laid out TP innermost, then CP, then the FSDP shard group; a group that "
            "does not fit in one node runs at the inter-node bandwidth",
            "engines: fsdp2 (FSDP/HSDP, CP, checkpointing) and megatron (TP x replicated DP) as "
            "the framework runs them; DeepSpeed ZeRO is not modelled (ZeRO-3 ~ FSDP)",
        ]


# -- the model ------------------------------------------------------------------------------------
def activation_elements(workload: Workload, plan: ParallelPlan) -> dict[str, float]:
    """Saved-for-backward elements per sample on one rank, and per forward independent of batch.

    Counted from models/dit.py under eager PyTorch with fused attention (nothing N x N is saved):
    per block 24 tokens x width tensors (LayerNorm inputs, modulated inputs, projection inputs
    and outputs, QK-norm inputs, rotated q/k, v, attention output, gates' operands) and the MLP's
    GELU input and output (2 x tokens x MLP width); TP splits the head-wise ones (14 of 24) and the
    MLP; CP splits the tokens.
    """
    dit, tp, cp = workload.dit, plan.tp, plan.cp
    d, heads, text = dit.hidden_size, dit.num_heads, dit.max_text_tokens
    tokens, local = dit.num_tokens, dit.num_tokens / cp
    patch_in = dit.in_channels * math.prod(dit.patch_size)
    block = (local * d * (10 + 14 / tp) + 2 * local * dit.mlp_hidden / tp
             + local * (5 * heads / tp + 6)  # logsumexp and QK-norm rstd per head; LayerNorm stats
             + 4 * text * d / tp)  # cross-attention key / value side
    outside = (3 * local * d + 2 * tokens * patch_in  # final layer; patch input and gathered output
               + 2 * text * d + text * dit.text_dim  # text embedding
               + 4 * workload.latent_elements)  # velocity, SDE log-prob and loss terms
    checkpointed = local * d  # a checkpointed block keeps only its input
    rope = 2 * tokens * (d // heads)  # cos / sin of q and k, per block, shared by the batch
    per_sample = dit.depth * (checkpointed if plan.activation_checkpointing else block) + outside
    return {"per_sample": per_sample, "block_per_sample": block,
            "per_forward": dit.depth * rope, "block_per_forward": rope}


def trajectory_bytes_per_sample(workload: Workload) -> float:
    """A rollout's fp32 tensors kept for the loss: the states x_0 (the initial noise) .. x_S, one
    behaviour log-prob per step, and the decoded video the rewards scored. The transition means are
    not kept (the sampler records them only when asked; training recomputes them)."""
    steps = workload.sampler_steps
    return 4.0 * ((steps + 1) * workload.latent_elements + steps + workload.pixel_elements)


def inference_elements(workload: Workload, plan: ParallelPlan) -> float:
    """Temporaries of a forward without grad, per sample, at the larger of a block's two stages:
    the MLP (its hidden activation before and after GELU, split by TP, beside the block input, the
    modulated input and the output: 3 token x width) and self-attention (block input and modulated
    input whole beside normed q / k / v, rotated q / k and the attention output, split by TP: 6
    token x width); plus about two latents of the sampler's and the patch embedding's. Counted
    from models/dit.py and checked against measured CPU peaks of sampling, whole and 2-way split
    (tests/test_plan.py)."""
    dit, tp = workload.dit, plan.tp
    local, d = dit.num_tokens / plan.cp, dit.hidden_size
    mlp_stage = 2 * dit.mlp_hidden / tp + 3 * d
    attention_stage = 6 * d / tp + 2 * d
    return local * max(mlp_stage, attention_stage) + 2 * workload.latent_elements


def estimate_memory(workload: Workload, plan: ParallelPlan, on_gpu: bool = True) -> dict[str, float]:
    """Peak bytes on one training rank (and on a rollout rank), by component.

    on_gpu: GPU runs gather FSDP parameters in bf16 when the run is bf16 and AdamW's foreach path
    allocates a state-sized temporary in the step; on CPUs both stay fp32 / per tensor.
    """
    from ddrl_scale.telemetry.plan_rollout import rollout_rank_memory  # it imports this module

    dit = workload.dit
    total_params, split_params = parameter_counts(dit)
    rank_params = split_params / plan.tp + (total_params - split_params)
    shard = 1 if plan.tp > 1 else plan.shard
    act_bytes = 2 if workload.dtype == "bf16" else 4
    gather_bytes = 2 if workload.dtype == "bf16" and on_gpu else 4
    out: dict[str, float] = {
        "parameters": 4 * rank_params / shard,
        "optimizer": 8 * rank_params / shard,
        "ema": 4 * rank_params / shard if workload.ema else 0.0,
        "reference": 4 * total_params if workload.kl_reference else 0.0,
        "buffers": 4 * dit.num_tokens * (dit.hidden_size // dit.num_heads) / 2,  # rotary angles
    }
    gradients = 4 * rank_params / shard
    block_params = block_parameter_counts(dit)[0] - block_parameter_counts(dit)[1] * (1 - 1 / plan.tp)
    root_params = rank_params - dit.depth * block_params
    out["fsdp_gathered"] = 0.0 if shard == 1 else (
        (root_params + 2 * block_params) * gather_bytes + 4 * block_params)
    samples = workload.samples / plan.data_parallel  # this rank's rollout samples
    data_samples = workload.data_samples / plan.data_parallel if workload.data_forwards else 0
    out["trajectory"] = samples * trajectory_bytes_per_sample(workload)
    elements = activation_elements(workload, plan)
    batch = samples + data_samples
    forwards = 2 if data_samples else 1  # each forward call recomputes its rotary tables
    activations = batch * elements["per_sample"] + forwards * elements["per_forward"]
    if plan.activation_checkpointing:  # backward recomputes one block of the larger forward
        activations += samples * elements["block_per_sample"] + elements["block_per_forward"]
    out["activations"] = activations * act_bytes
    # with several trained steps, gradients from the previous backward live through the forward
    accumulating = workload.trained_steps > 1
    step_transient = 4 * rank_params / shard if on_gpu else 0.0
    static = sum(out.values()) - out["activations"]
    out["gradients"] = gradients
    out["train_peak"] = static + max(out["activations"] + (gradients if accumulating else 0.0),
                                     gradients + step_transient)
    out["rollout_peak"] = static + samples * inference_elements(workload, plan) * act_bytes
    out["total"] = max(out["train_peak"], out["rollout_peak"])
    # a rollout rank's parts, prefixed: "rollout_rank_total" is what must fit on a rollout GPU
    out.update({f"rollout_rank_{key}": value for key, value in rollout_rank_memory(workload, plan).items()})
    return out


def _ring(size: int) -> float:
    """Fraction of a buffer each rank sends in a ring all-gather or reduce-scatter of `size` ranks."""
    return (size - 1) / size


def communication(workload: Workload, plan: ParallelPlan, cluster: Cluster) -> dict[str, dict]:
    """Bytes each training rank sends per iteration, by kind, with the link each kind runs on.

    Returns {kind: {"bytes": float, "link": "intra"|"inter", "gb_s": link GB/s}}; kinds: fsdp
    (parameter all-gathers, gradient reduce-scatters), replicate (HSDP / megatron data-parallel
    gradient all-reduce), tp (activation all-reduces), cp (Ulysses all-to-alls), publish (weights
    to the rollout ranks); and rollout_tp: what each rank of a tensor-parallel rollout copy sends
    in its activation all-reduces (a rollout rank's traffic, not a trainer's).
    """
    dit = workload.dit
    total_params, split_params = parameter_counts(dit)
    rank_params = split_params / plan.tp + (total_params - split_params)
    bf16 = workload.dtype == "bf16"
    act_bytes, gather_bytes = (2, 2) if bf16 else (4, 4)
    samples = workload.samples / plan.data_parallel
    data_samples = workload.data_samples / plan.data_parallel if workload.data_forwards else 0
    grad_forwards = workload.trained_steps + workload.data_forwards
    rollout_forwards = 0 if plan.rollout_ranks else workload.sampler_steps
    out: dict[str, dict] = {}

    def add(kind: str, volume: float, group: int, stride: int) -> None:
        if volume > 0 and group > 1:
            gb_s, link = cluster.bandwidth(group, stride)
            out[kind] = {"bytes": volume, "link": link, "gb_s": gb_s}

    if plan.tp == 1 and plan.shard > 1:
        gather = _ring(plan.shard) * rank_params * gather_bytes
        scatter = _ring(plan.shard) * rank_params * 4  # gradients reduce in fp32
        add("fsdp", (2 * grad_forwards + rollout_forwards) * gather + grad_forwards * scatter,
            plan.shard, 1)
    replicas = plan.data_parallel if plan.tp > 1 else plan.replicate
    if replicas > 1:  # an all-reduce moves twice a reduce-scatter
        shard = 1 if plan.tp > 1 else plan.shard
        reductions = 1 if plan.tp > 1 else grad_forwards  # megatron: once per step; FSDP: per pass
        add("replicate", reductions * 2 * _ring(replicas) * rank_params / shard * 4, replicas,
            plan.tp * (1 if plan.tp > 1 else plan.shard))
    tokens_dim = dit.num_tokens * dit.hidden_size * act_bytes  # one sample's token x width tensor
    if plan.tp > 1:
        text_dim = dit.max_text_tokens * dit.hidden_size * act_bytes
        forward = 3 * tokens_dim  # attention outputs and the second MLP layer (row parallel)
        backward = 5 * tokens_dim + 2 * text_dim  # input gradients of the column-parallel layers
        trained = workload.trained_steps * samples + workload.data_forwards * data_samples
        per_block = trained * (forward + backward) + rollout_forwards * samples * forward
        add("tp", dit.depth * per_block * 2 * _ring(plan.tp), plan.tp, 1)
    if plan.cp > 1:
        local = tokens_dim / plan.cp
        gathered = dit.num_tokens * dit.in_channels * math.prod(dit.patch_size) * act_bytes
        trained = workload.trained_steps * samples + workload.data_forwards * data_samples
        per_sample_forward = dit.depth * 4 * local * _ring(plan.cp) + _ring(plan.cp) * gathered
        per_sample_backward = dit.depth * 4 * local * _ring(plan.cp)
        add("cp", trained * (per_sample_forward + per_sample_backward)
            + rollout_forwards * samples * per_sample_forward, plan.cp, plan.tp)
    if plan.rollout_ranks:
        copy_bytes = 2 if bf16 else 4
        gathered_publish = _ring(plan.shard) * total_params * copy_bytes if plan.shard > 1 else 0.0
        # trainer 0 broadcasts the whole model; the sharded trainers gather it tensor by tensor
        add("publish", total_params * copy_bytes + gathered_publish, plan.trainers + 1,
            1 if cluster.nodes == 1 else cluster.gpus_per_node)
    if plan.rollout_tp > 1 and plan.rollout_copies:
        # row-parallel self-attention out, cross-attention out and MLP out sum their partial
        # token x width outputs over the copy: 3 all-reduces per block and forward, in the copy's
        # precision, for every sampler step of the copy's samples
        copy_samples = workload.samples / plan.rollout_copies
        copy_tokens_dim = dit.num_tokens * dit.hidden_size * (2 if bf16 else 4)
        volume = (workload.sampler_steps * copy_samples * dit.depth * 3 * copy_tokens_dim
                  * 2 * _ring(plan.rollout_tp))
        gb_s, link = cluster.rollout_copy_bandwidth(plan)
        out["rollout_tp"] = {"bytes": volume, "link": link, "gb_s": gb_s}
    return out


@dataclass
class PlanResult:
    plan: ParallelPlan
    reasons: list[str]  # why it cannot run; empty = feasible
    memory: dict[str, float] = field(default_factory=dict)
    comm: dict[str, dict] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"plan": self.plan.describe(), "engine": self.plan.engine, **asdict(self.plan),
                "feasible": self.feasible, "reasons": self.reasons,
                "memory_gb": {key: value / GB for key, value in self.memory.items()},
                "comm_gb": {key: {**value, "bytes": value["bytes"] / GB}
                            for key, value in self.comm.items()},
                **self.times}


def structural_reasons(workload: Workload, plan: ParallelPlan, cluster: Cluster) -> list[str]:
    """Why the framework cannot run `plan` at all (before any memory question)."""
    from ddrl_scale.telemetry.plan_rollout import rollout_reasons  # it imports this module

    dit, reasons = workload.dit, []
    if plan.trainers < 1:
        return [f"{plan.rollout_ranks} rollout ranks leave no trainer on {cluster.gpus} GPUs"]
    reasons.extend(rollout_reasons(workload, plan))
    if dit.num_heads % plan.tp or dit.mlp_hidden % plan.tp:
        reasons.append(f"TP={plan.tp} must divide num_heads={dit.num_heads} and the MLP width "
                       f"{dit.mlp_hidden}")
    if dit.num_heads % plan.cp:
        reasons.append(f"CP={plan.cp} must divide num_heads={dit.num_heads} (Ulysses splits heads)")
    if dit.num_tokens % plan.cp:
        reasons.append(f"CP={plan.cp} must divide the {dit.num_tokens} video tokens")
    if plan.tp > 1 and plan.cp > 1:
        reasons.append("TP runs on the megatron engine and CP on fsdp2: no engine has both")
    if plan.tp > 1 and plan.shard > 1:
        reasons.append("the megatron engine (TP) replicates its data-parallel ranks: no FSDP shard")
    if plan.tp > 1 and plan.activation_checkpointing:
        reasons.append("activation checkpointing is applied by the fsdp2 engine only")
    if plan.tp == 1 and plan.cp > 1 and plan.replicate > 1:
        reasons.append("CP with HSDP (parallel.dp_replicate > 1) is not supported: FSDP over all ranks")
    if plan.trainers % (plan.tp * plan.cp) or plan.trainers % plan.shard:
        reasons.append(f"TP x CP = {plan.tp * plan.cp} and the shard group {plan.shard} must divide "
                       f"the {plan.trainers} trainer ranks")
    elif workload.prompts_per_step % plan.data_parallel:
        reasons.append(f"algo.prompts_per_step={workload.prompts_per_step} must be a multiple of the "
                       f"{plan.data_parallel} data-parallel ranks")
    return reasons


def evaluate_plan(workload: Workload, plan: ParallelPlan, cluster: Cluster,
                  assumptions: Assumptions = Assumptions()) -> PlanResult:
    """Memory, communication, step time and MFU of one plan, or the reasons it cannot run."""
    reasons = structural_reasons(workload, plan, cluster)
    if reasons:
        return PlanResult(plan, reasons)
    memory = estimate_memory(workload, plan, on_gpu=cluster.device.name != "cpu")
    usable = cluster.device.memory_gb * GB * assumptions.usable_memory_fraction
    for key, role in (("total", "training"), ("rollout_rank_total", "rollout")):
        if memory.get(key, 0.0) > usable:
            reasons.append(f"needs {memory[key] / GB:.1f} GB per {role} GPU, "
                           f"{usable / GB:.1f} GB usable")
    comm = communication(workload, plan, cluster)
    return PlanResult(plan, reasons, memory, comm, step_time(workload, plan, cluster, comm, assumptions))


def step_time(workload: Workload, plan: ParallelPlan, cluster: Cluster, comm: dict[str, dict],
              assumptions: Assumptions) -> dict[str, float]:
    mode = "bf16" if workload.dtype == "bf16" else "fp32"
    rate = cluster.device.peak_flops[mode] * assumptions.compute_efficiency
    flops = workload.flops
    train_flops = flops["policy"] + flops["data"]
    if plan.activation_checkpointing:  # the backward recomputes each block's forward (1/3 of 3x)
        train_flops *= 4.0 / 3.0
    train_compute = train_flops / plan.trainers / rate
    rollout_compute = flops["rollout"] / (plan.rollout_ranks or plan.trainers) / rate

    def seconds(kind: str) -> float:
        entry = comm.get(kind)
        return 0.0 if entry is None else entry["bytes"] / (entry["gb_s"] * GB * assumptions.comm_efficiency)

    critical = seconds("tp") + seconds("cp")
    overlapped = seconds("fsdp") + seconds("replicate")
    publish = seconds("publish")
    # a tensor-parallel rollout copy splits the sampling FLOPs over its ranks (so the per-rank
    # compute above already is rollout FLOPs / rollout ranks) and waits for its all-reduces
    rollout_comm = seconds("rollout_tp")
    rollout = rollout_compute + rollout_comm
    rollout_exposed = 0.0
    if plan.rollout_ranks:
        train = train_compute + critical + max(0.0, overlapped - train_compute)
        if assumptions.policy_lag > 0:
            step = max(rollout, train + publish)
            # the all-reduces show only where they make the rollout side the slower one
            rollout_exposed = min(rollout_comm, max(0.0, rollout - train - publish))
        else:
            step = rollout + publish + train
            rollout_exposed = rollout_comm
        compute = train_compute
    else:
        compute = train_compute + rollout_compute
        step = compute + critical + max(0.0, overlapped - compute)
    return {"step_s": step, "compute_s": compute, "rollout_compute_s": rollout_compute,
            "rollout_s": rollout,
            "comm_s": critical + overlapped + publish + rollout_comm,
            "comm_exposed_s": critical + publish + max(0.0, overlapped - compute) + rollout_exposed,
            "mfu": sum(flops.values()) / step / (cluster.gpus * cluster.device.peak_flops[mode]),
            "samples_per_s": workload.samples / step}


def divisors(number: int) -> list[int]:
    return [value for value in range(1, number + 1) if number % value == 0]


def enumerate_plans(cluster: Cluster, rollout_ranks: tuple[int, ...] = (0,),
                    activation_checkpointing: tuple[bool, ...] = (False, True),
                    rollout_tp: tuple[int, ...] = (1,)) -> list[ParallelPlan]:
    """The plans the engines can express whose sizes divide the trainer ranks: fsdp2 with any
    FSDP shard group (HSDP below the world), with Ulysses CP over the whole FSDP world, with or
    without checkpointing; megatron TP x data parallel; TP x CP too, which `evaluate_plan`
    rejects (no engine has both) so that the table says so. Each with every rollout TP of
    `rollout_tp` when there are rollout ranks (colocated rollouts have none). Other limits (heads,
    tokens, batch, memory) are checked by `evaluate_plan`."""
    plans = []
    for rollout in rollout_ranks:
        for rtp in rollout_tp if rollout else (1,):
            trainers = cluster.gpus - rollout
            if trainers < 1:
                plans.append(ParallelPlan(trainers, rollout_ranks=rollout, rollout_tp=rtp))
                continue
            for tp in divisors(trainers):
                for cp in divisors(trainers // tp):
                    if tp > 1:  # megatron: replicated data parallel, no checkpointing
                        plans.append(ParallelPlan(trainers, tp, cp, 1, False, rollout, rtp))
                        continue
                    shards = [trainers] if cp > 1 else divisors(trainers)
                    plans.extend(ParallelPlan(trainers, 1, cp, shard, checkpointing, rollout, rtp)
                                 for shard in shards for checkpointing in activation_checkpointing)
    return plans


def rank_plans(workload: Workload, cluster: Cluster, assumptions: Assumptions = Assumptions(),
               rollout_ranks: tuple[int, ...] = (0,),
               rollout_tp: tuple[int, ...] = (1,)) -> tuple[list[PlanResult], list[PlanResult]]:
    """(feasible plans fastest first, then by memory; rejected plans with their reasons).
    rollout_tp: the rollout TP sizes to consider with each rollout rank count; the smallest one
    that runs is added where none of these does (see `plan_rollout.rollout_tp_candidates`)."""
    from ddrl_scale.telemetry.plan_rollout import rollout_tp_candidates  # it imports this module

    plans = [plan for rollout in rollout_ranks
             for plan in enumerate_plans(cluster, (rollout,), rollout_tp=rollout_tp_candidates(
                 workload, cluster, rollout, rollout_tp, assumptions))]
    results = [evaluate_plan(workload, plan, cluster, assumptions) for plan in plans]
    feasible = sorted((r for r in results if r.feasible),
                      key=lambda r: (round(r.times["step_s"], 9), r.memory["total"]))
    return feasible, [r for r in results if not r.feasible]


# -- the command ----------------------------------------------------------------------------------
