"""`ddrl plan` on the command line: flags and a run config -> workload, cluster -> ranked table.

The model itself (memory, communication, step time, ranking) is `telemetry/plan.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from ddrl_scale.config import ConfigError, RunConfig, load_config
from ddrl_scale.telemetry.devices import DEVICES, DeviceSpec, device_spec
from ddrl_scale.telemetry.plan import (
    GB,
    MEMORY_PARTS,
    Assumptions,
    Cluster,
    PlanResult,
    Workload,
    parameter_counts,
    rank_plans,
)
from ddrl_scale.telemetry.plan_changes import Question, describe_changes, smallest_changes


def latent_size(pixels: int, factor: int, flag: str, causal: bool = False) -> int:
    """Latent length of `pixels` under a VAE compression `factor`. Causal video VAEs (Wan,
    HunyuanVideo, CogVideoX) encode the first frame alone: frames = 1 + factor * (latent - 1)."""
    if pixels < 1 or factor < 1:
        raise ConfigError(f"{flag}: expected positive sizes, got {pixels} with compression {factor}")
    if causal and factor > 1 and (pixels - 1) % factor == 0:
        return 1 + (pixels - 1) // factor
    if pixels % factor:
        hint = f" or 1 + a multiple of {factor} (causal VAE)" if causal else ""
        raise ConfigError(f"{flag}={pixels}: expected a multiple of the VAE compression {factor}{hint}")
    return pixels // factor


def _triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints T,H,W, got '{text}'")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--config", default=None, help="a run config (YAML); flags override it")
    model = parser.add_argument_group("model (default: the config's)")
    model.add_argument("--layers", type=int, help="DiT blocks (model.depth)")
    model.add_argument("--hidden-size", type=int, help="width (model.hidden_size)")
    model.add_argument("--heads", type=int, help="attention heads (model.num_heads)")
    model.add_argument("--mlp-ratio", type=float, help="MLP width / width (model.mlp_ratio)")
    model.add_argument("--patch", type=_triple, help="patch T,H,W in latents (model.patch_size)")
    model.add_argument("--text-tokens", type=int, help="text tokens (model.max_text_tokens)")
    video = parser.add_argument_group("video (pixels; default: the config's latent shape)")
    video.add_argument("--frames", type=int, help="frames of a generated video")
    video.add_argument("--height", type=int, help="pixel height")
    video.add_argument("--width", type=int, help="pixel width")
    video.add_argument("--vae-compression", type=_triple, default=(1, 1, 1),
                       help="VAE compression T,H,W (Wan 2.1: 4,8,8); frames may be 1 + k*T (causal)")
    video.add_argument("--latent-channels", type=int, help="latent channels (video.channels)")
    ddrl = parser.add_argument_group("DDRL iteration (default: the config's)")
    ddrl.add_argument("--prompts", type=int, help="prompts per step (algo.prompts_per_step)")
    ddrl.add_argument("--group-size", type=int, help="samples per prompt (algo.group_size)")
    ddrl.add_argument("--sampler-steps", type=int, help="denoising steps (sampler.num_steps)")
    ddrl.add_argument("--dtype", choices=["fp32", "bf16"], help="run.dtype")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--gpu", default="h100",
                         help=f"GPU type: {', '.join(sorted(DEVICES))}, h100, or cpu (measured here)")
    cluster.add_argument("--gpus-per-node", type=int,
                         help="default: launch.nproc_per_node with --config, else 8")
    cluster.add_argument("--nodes", type=int, help="default: launch.nodes with --config, else 1")
    cluster.add_argument("--memory-gb", type=float, help="override the device memory")
    cluster.add_argument("--peak-tflops", type=float, help="override the dense peak of --dtype")
    cluster.add_argument("--intra-node-gbs", type=float, help="override GB/s per GPU inside a node")
    cluster.add_argument("--inter-node-gbs", type=float, help="override GB/s per GPU between nodes")
    model_assumptions = parser.add_argument_group("model assumptions")
    model_assumptions.add_argument("--rollout-ranks", type=int, nargs="+", default=None,
                                   help="separate rollout ranks to consider (0 = colocated; default: "
                                        "rollout.num_ranks when rollout.mode=disaggregated, else 0)")
    model_assumptions.add_argument("--rollout-tp", type=int, nargs="+", default=None,
                                   help="rollout ranks per tensor-parallel inference copy to consider "
                                        "(default: rollout.tp_size, 1 unless the config sets it); the "
                                        "smallest one that runs is added where none of these does")
    model_assumptions.add_argument("--policy-lag", type=int, default=None,
                                   help="rollout.max_policy_lag (default: the config's)")
    model_assumptions.add_argument("--efficiency", type=float, default=Assumptions.compute_efficiency,
                                   help="fraction of peak FLOP/s the matmuls reach")
    model_assumptions.add_argument("--comm-efficiency", type=float,
                                   default=Assumptions.comm_efficiency,
                                   help="fraction of link bandwidth collectives reach")
    output = parser.add_argument_group("output")
    output.add_argument("--top", type=int, default=10, help="feasible plans to print")
    output.add_argument("--show-rejected", action="store_true", help="list every rejected plan")
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`ddrl plan` under the main command line's subparsers."""
    parser = subparsers.add_parser("plan", help="predict memory, communication, step time and MFU of "
                                                "parallel plans, and rank them")
    add_arguments(parser)
    parser.set_defaults(handler=cmd_plan)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, tuple[int, ...] | None]:
    """The run config with the flags applied, and the decoded video's pixel shape (None = the
    latent shape, when no pixel flag is given)."""
    base = load_config(args.config, args.overrides)
    compression = args.vae_compression
    flags = {"model.depth": args.layers, "model.hidden_size": args.hidden_size,
             "model.num_heads": args.heads, "model.mlp_ratio": args.mlp_ratio,
             "model.patch_size": list(args.patch) if args.patch else None,
             "model.max_text_tokens": args.text_tokens, "video.channels": args.latent_channels,
             "algo.prompts_per_step": args.prompts, "algo.group_size": args.group_size,
             "sampler.num_steps": args.sampler_steps, "run.dtype": args.dtype}
    pixels = None
    if any(value is not None for value in (args.frames, args.height, args.width)):
        video = base.video
        frames = args.frames or video.num_frames * compression[0]
        height = args.height or video.height * compression[1]
        width = args.width or video.width * compression[2]
        flags.update({"video.num_frames": latent_size(frames, compression[0], "--frames", causal=True),
                      "video.height": latent_size(height, compression[1], "--height"),
                      "video.width": latent_size(width, compression[2], "--width")})
        pixels = (3, frames, height, width)
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return load_config(args.config, [*args.overrides, *overrides]), pixels


def cluster_from_args(args: argparse.Namespace, config: RunConfig, dtype: str) -> Cluster:
    if args.gpu.lower() == "cpu":
        import psutil

        from ddrl_scale.telemetry.throughput import RUN_DTYPES, device_peak_flops

        spec = DeviceSpec("cpu", psutil.virtual_memory().total / GB,
                          {dtype: device_peak_flops("cpu", RUN_DTYPES[dtype])}, 5.0, 1.25,
                          "gloo over loopback (assumed)", "10 Gb/s Ethernet (assumed)")
    else:
        try:
            spec = device_spec(args.gpu)
        except ValueError as error:
            raise ConfigError(f"--gpu: {error}") from None
    if args.peak_tflops is not None:
        spec = replace(spec, peak_flops={**spec.peak_flops, dtype: args.peak_tflops * 1e12})
    for flag, key in ((args.memory_gb, "memory_gb"), (args.intra_node_gbs, "intra_node_gb_s"),
                      (args.inter_node_gbs, "inter_node_gb_s")):
        if flag is not None:
            if flag <= 0:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a value > 0, got {flag}")
            spec = replace(spec, **{key: flag})
    launch = config.launch if args.config else None
    gpus_per_node = args.gpus_per_node or (launch.nproc_per_node if launch else 8)
    nodes = args.nodes or (launch.nodes if launch else 1)
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError(f"--gpus-per-node and --nodes: expected >= 1, got {gpus_per_node}, {nodes}")
    return Cluster(spec, gpus_per_node, nodes)


def report(workload: Workload, cluster: Cluster, assumptions: Assumptions,
           feasible: list[PlanResult], rejected: list[PlanResult], top: int,
           show_rejected: bool, changes: list[str] | None = None) -> str:
    """changes: the lines of `plan_changes.describe_changes`, printed when no plan is feasible."""
    dit = workload.dit
    params = parameter_counts(dit)[0]
    lines = [
        f"model: {dit.depth} layers x {dit.hidden_size} wide, {dit.num_heads} heads, "
        f"{params / 1e9:.3f}B parameters; latent video {dit.in_channels}x{dit.num_frames}x"
        f"{dit.height}x{dit.width} -> {dit.num_tokens} tokens",
        f"iteration: {workload.prompts_per_step} prompts x {workload.group_size} samples, "
        f"{workload.sampler_steps} sampler steps ({workload.trained_steps} trained), "
        f"{workload.dtype}, {sum(workload.flops.values()) / 1e15:.3f} PFLOP",
        f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} {cluster.device.name}",
        "",
        f"{'#':>3}  {'plan':<32} {'engine':<9} {'mem/GPU GB':>10} {'comm GB/step':>12} "
        f"{'step s':>9} {'MFU':>6} {'samples/s':>10}",
    ]
    for index, result in enumerate(feasible[:top], start=1):
        comm = sum(entry["bytes"] for entry in result.comm.values()) / GB
        memory = max(result.memory["total"], result.memory.get("rollout_rank_total", 0.0)) / GB
        lines.append(f"{index:>3}  {result.plan.describe():<32} {result.plan.engine:<9} "
                     f"{memory:>10.2f} {comm:>12.2f} {result.times['step_s']:>9.3g} "
                     f"{result.times['mfu']:>6.1%} {result.times['samples_per_s']:>10.3g}")
    if not feasible:
        lines.append("     no feasible plan")
        too_big = sorted((r for r in rejected if r.memory), key=lambda r: r.memory["total"])
        for result in too_big[:3]:
            lines.append(f"     closest: {result.plan.describe()}: {'; '.join(result.reasons)}")
        lines.extend(changes or [])
    else:
        if len(feasible) > top:
            lines.append(f"     ... {len(feasible) - top} more feasible plans (--top)")
        best = feasible[0]
        parts = ", ".join(f"{key} {value / GB:.3g}" for key, value in best.memory.items()
                          if key in MEMORY_PARTS and value > 0)
        lines.append(f"  #1 memory per GPU (GB): {parts}")
        if best.plan.rollout_ranks:
            prefix = "rollout_rank_"
            parts = ", ".join(f"{key[len(prefix):]} {value / GB:.3g}" for key, value in best.memory.items()
                              if key.startswith(prefix) and key != f"{prefix}total" and value > 0)
            lines.append(f"  #1 memory per rollout GPU (GB, rollout TP {best.plan.rollout_tp}): {parts}")
        lines.append("  #1 traffic per GPU and step (GB): " + (", ".join(
            f"{kind} {entry['bytes'] / GB:.3g} ({entry['link']}-node)"
            for kind, entry in best.comm.items()) or "none"))
    lines.append("")
    counts: dict[str, int] = {}
    for result in rejected:
        for reason in result.reasons:
            key = reason if not reason.startswith("needs ") else "does not fit in memory"
            counts[key] = counts.get(key, 0) + 1
    lines.append(f"rejected: {len(rejected)} plans")
    lines.extend(f"  {count:>5} x {reason}" for reason, count in sorted(counts.items(),
                                                                       key=lambda kv: -kv[1]))
    if show_rejected:
        lines.extend(f"  {result.plan.describe():<32} {'; '.join(result.reasons)}"
                     for result in rejected)
    lines.append("")
    lines.append("assumptions:")
    lines.extend(f"  - {line}" for line in assumptions.describe(workload, cluster))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> None:
    config, pixels = config_from_args(args)
    workload = Workload.from_config(config, pixels)
    cluster = cluster_from_args(args, config, workload.dtype)
    lag = args.policy_lag
    if lag is None:
        lag = getattr(getattr(config, "rollout", None), "max_policy_lag", 0)
    for value, flag in ((args.efficiency, "--efficiency"), (args.comm_efficiency, "--comm-efficiency")):
        if not 0 < value <= 1:
            raise ConfigError(f"{flag}: expected a fraction in (0, 1], got {value}")
    rollout = config.rollout
    rollout_ranks = args.rollout_ranks or [rollout.num_ranks if rollout.mode == "disaggregated" else 0]
    rollout_tp = args.rollout_tp or [rollout.tp_size]
    if min(rollout_ranks) < 0 or lag < 0 or args.top < 0:
        raise ConfigError("--rollout-ranks, --policy-lag and --top: expected values >= 0")
    if min(rollout_tp) < 1:
        raise ConfigError(f"--rollout-tp: expected values >= 1, got {min(rollout_tp)}")
    assumptions = Assumptions(args.efficiency, args.comm_efficiency, policy_lag=lag)
    feasible, rejected = rank_plans(workload, cluster, assumptions, tuple(rollout_ranks),
                                    tuple(dict.fromkeys(rollout_tp)))
    changes = [] if feasible else smallest_changes(Question(
        config, pixels, cluster, assumptions, tuple(rollout_ranks), tuple(dict.fromkeys(rollout_tp))))
    if args.json:
        print(json.dumps({
            "workload": {"dit": workload.dit.to_dict(), "parameters": parameter_counts(workload.dit)[0],
                         "tokens": workload.dit.num_tokens, "prompts_per_step": workload.prompts_per_step,
                         "group_size": workload.group_size, "sampler_steps": workload.sampler_steps,
                         "trained_steps": workload.trained_steps, "dtype": workload.dtype,
                         "flops": workload.flops},
            "cluster": {"gpus_per_node": cluster.gpus_per_node, "nodes": cluster.nodes,
                        "device": asdict(cluster.device)},
            "assumptions": assumptions.describe(workload, cluster),
            "plans": [result.to_dict() for result in feasible],
            "rejected": [result.to_dict() for result in rejected],
            "changes": [change.to_dict() for change in changes],
        }, indent=1))
    else:
        usable = cluster.device.memory_gb * assumptions.usable_memory_fraction
        print(report(workload, cluster, assumptions, feasible, rejected, args.top, args.show_rejected,
                     describe_changes(changes, usable)))


def main(argv: list[str] | None = None) -> int:
    """`python -m ddrl_scale.telemetry.plan_cli ...`: the same as `ddrl plan ...`."""
    parser = argparse.ArgumentParser(prog="ddrl plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_plan(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"ddrl plan: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
