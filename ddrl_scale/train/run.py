"""`ddrl train` / `ddrl demo`: a full run with evaluation before and after, and its artifacts.

Writes into run.output_dir: config.yaml, metrics.jsonl, checkpoints/, eval_before.json,
eval_after.json, summary.json, curves.png and samples_before_after.gif.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ddrl_scale.config import RunConfig
from ddrl_scale.models import flops_per_sample
from ddrl_scale.parallel.distributed import barrier
from ddrl_scale.parallel.roles import init_roles
from ddrl_scale.rollout.worker import RolloutWorker
from ddrl_scale.storage.run_files import atomic_write_bytes
from ddrl_scale.train.metrics import read_metrics
from ddrl_scale.train.report import before_after_gif, plot_curves, write_json
from ddrl_scale.train.trainer import Trainer

logger = logging.getLogger(__name__)


def _before(trainer: Trainer, run_dir: Path) -> tuple[dict, torch.Tensor]:
    """Evaluation of the starting weights, kept on disk so a resumed run reports the true 'before'."""
    json_path, videos_path = run_dir / "eval_before.json", run_dir / "eval_before_videos.safetensors"
    if trainer.step > 0 and json_path.is_file() and videos_path.is_file():
        return json.loads(json_path.read_text()), load_file(str(videos_path))["videos"]
    result = trainer.run_evaluation()  # every rank: a sharded policy's forward is collective
    trainer.loggers.log_videos("samples/before", result.videos[:8], 0)
    if trainer.world.is_main:
        write_json(result.summary(), json_path)
        # atomic, as every run file that a resume reads back (storage/run_files.py)
        atomic_write_bytes(videos_path, save({"videos": result.videos.cpu().contiguous()}))
    return result.summary(), result.videos


def run_training(config: RunConfig) -> dict:
    """Every rank calls; trainer rank 0 writes the artifacts and returns the summary (others: {}).

    With rollout.mode=disaggregated the last rollout.num_ranks ranks serve rollouts instead."""
    start = time.time()
    resume = config.train.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint folder '{resume}' does not exist")
    if config.rollout.mode == "disaggregated":
        roles, world = init_roles(config)
        if roles.role == "rollout":
            RolloutWorker(config, roles, world).run()
            return {}
        trainer = Trainer(config, world, roles)
    else:
        trainer = Trainer(config)
    trainer.maybe_resume()
    run_dir, main = trainer.run_dir, trainer.world.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(trainer.world, "run directory")
    evaluating = config.train.eval_prompts > 0
    before, before_videos = _before(trainer, run_dir) if evaluating else (None, None)
    if not trainer.train():  # preempted: checkpointed; the requeued job resumes and reports
        trainer.loggers.close()
        logger.warning("stopped at step %d on a preemption request; resume with the same command",
                       trainer.step)
        return {"steps": trainer.step, "preempted": True} if main else {}
    summary = {"steps": trainer.step, "seconds": round(time.time() - start, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}, device {trainer.device}",
               "train_flops_per_sample": flops_per_sample(trainer.engine.model.config),
               "eval_sampler": "ode (fixed prompts and initial noise)", "before": before}
    after = trainer.run_evaluation() if evaluating else None
    if after is not None:
        trainer.loggers.log_videos("samples/after", after.videos[:8], trainer.step)
    trainer.loggers.close()
    if not main:
        return {}
    if after is not None:
        summary["after"] = after.summary()
        write_json(summary["after"], run_dir / "eval_after.json")
        columns = config.train.eval_samples_per_prompt * 4
        summary["samples_gif"] = str(before_after_gif(before_videos[:32], after.videos[:32],
                                                      run_dir / "samples_before_after.gif", columns))
    if (run_dir / "metrics.jsonl").stat().st_size:
        summary["curves_png"] = str(plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png"))
        lags = [record["policy_lag"] for record in read_metrics(run_dir / "metrics.jsonl")
                if "policy_lag" in record]
        if lags:  # disaggregated rollouts: how stale the trained-on rollouts were, step by step
            summary["policy_lag_histogram"] = {str(int(lag)): lags.count(lag) for lag in sorted(set(lags))}
    write_json(summary, run_dir / "summary.json")
    return summary


def describe(summary: dict, run_dir: str) -> str:
    if summary.get("preempted"):
        return f"preempted after step {summary['steps']}; checkpoint in {run_dir}/checkpoints"
    lines = [f"finished {summary['steps']} steps in {summary['seconds']:.0f} s "
             f"(peak RSS {summary['peak_rss_mb']:.0f} MB; {summary['machine']}); outputs in {run_dir}/"]
    if summary.get("before") and summary.get("after"):
        before, after = summary["before"], summary["after"]
        lines.append(
            f"evaluation reward (mean over {after['num_samples']} samples, {summary['eval_sampler']}):"
            f" before {before['reward_mean']:.4f}  after {after['reward_mean']:.4f}")
        for key in sorted(k for k in after if k.startswith("reward_") and k != "reward_mean"):
            lines.append(f"  {key[7:-5]:>20}: before {before[key]:.4f}  after {after[key]:.4f}")
    if "policy_lag_histogram" in summary:
        lags = ", ".join(f"lag {lag}: {count}" for lag, count in summary["policy_lag_histogram"].items())
        lines.append(f"rollouts trained on, by policy lag (steps): {lags}")
    for key in ("curves_png", "samples_gif"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')}: {summary[key]}")
    lines.append(f"metrics: {run_dir}/metrics.jsonl")
    return "\n".join(lines)
