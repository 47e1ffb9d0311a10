"""The report of `ddrl experiment hacking`: results.json, two PNG plots and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl_scale.experiments.hacking import MEASURES, METHODS

COLORS = {"ddrl": "tab:blue", "flow_grpo": "tab:orange", "reward_only": "tab:red"}
LABELS = {"reward": "held-out reward (weighted)", "data_fit": "data fit: flow-matching loss on "
          "held-out real videos (lower = better)", "diversity": "within-prompt diversity (RMS)",
          "realism_fd": "realism: feature Frechet distance to real videos (lower = better)"}


def _plots(summary: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method, steps in summary.items():
        order = sorted(steps, key=int)
        x = [steps[s]["data_fit"][0] for s in order]
        y = [steps[s]["reward"][0] for s in order]
        axis.errorbar(x, y, xerr=[steps[s]["data_fit"][1] for s in order],
                      yerr=[steps[s]["reward"][1] for s in order], color=COLORS[method],
                      marker="o", capsize=3, label=method)
        axis.annotate(f"step {order[-1]}", (x[-1], y[-1]), fontsize=7, color=COLORS[method])
    axis.set(xlabel=LABELS["data_fit"], ylabel=LABELS["reward"],
             title="reward against data fit (mean +- std over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "reward_vs_data_fit.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, key in zip(axes.flat, MEASURES):
        for method, steps in summary.items():
            order = sorted(steps, key=int)
            mean = [steps[s][key][0] for s in order]
            spread = [steps[s][key][1] for s in order]
            axis.plot([int(s) for s in order], mean, color=COLORS[method], marker="o", label=method)
            axis.fill_between([int(s) for s in order], [m - d for m, d in zip(mean, spread)],
                              [m + d for m, d in zip(mean, spread)], color=COLORS[method], alpha=0.15)
        axis.set(xlabel="step", title=LABELS[key])
        axis.title.set_fontsize(9)
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(out_dir / "measures_by_step.png", dpi=100)
    plt.close(figure)
    return ["reward_vs_data_fit.png", "measures_by_step.png"]


def _table(summary: dict) -> list[str]:
    keys = ["reward", "reward_caption_alignment", "reward_saturation", *MEASURES[1:]]
    present = [k for k in keys if k in next(iter(next(iter(summary.values())).values()))]
    lines = ["| method | step | " + " | ".join(present) + " |",
             "|---|---|" + "---|" * len(present)]
    for method, steps in summary.items():
        order = sorted(steps, key=int)
        for step in (order[0], order[-1]):
            cells = [f"{steps[step][k][0]:.4f} +- {steps[step][k][1]:.4f}" for k in present]
            lines.append(f"| {method} | {step} | " + " | ".join(cells) + " |")
    return lines


def write_report(result: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = {**result, "runs": [{k: v for k, v in run.items() if k != "first_rollout"}
                                 for run in result["runs"]]}
    (out_dir / "results.json").write_text(json.dumps(stored, indent=1) + "\n")
    plots = _plots(result["summary"], out_dir)
    setting = result["setting"]
    lines = [
        f"# Reward hacking at toy scale: DDRL vs Flow-GRPO-style vs reward-only ({result['date']})",
        "",
        f"Command: `{command}` ({result['seconds']:.0f} s on {result['machine']}).",
        "",
        f"Each method: {setting['seeds']} seeds x {setting['steps']} steps from the shipped base "
        "model on the demo rewards (caption_alignment + saturation; saturation is hackable). The "
        "methods differ only in the loss weights: "
        + "; ".join(f"{m}: `{' '.join(o)}`" for m, o in METHODS.items())
        + ". Same seeds, data and step-0 rollouts (checked by the quick mode in the test suite).",
        "",
        f"Measured every {setting['eval_every']} steps on {setting['eval_prompts']} held-out prompts x "
        f"{setting['samples_per_prompt']} samples (ODE sampler, fixed noise) and "
        f"{setting['held_out_videos']} held-out real videos: reward; data fit (flow-matching loss "
        "on the held-out real videos at sigma 0.1..0.9, fixed noise); within-prompt diversity "
        "(mean pairwise RMS distance); realism (Frechet distance between Gaussian fits of 8 hand-made "
        "video features of generated and real videos; the reward never sees real videos). Mean +- "
        "std over seeds:",
        "",
        *_table(result["summary"]),
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
