"""`ddrl train` / `ddrl demo`: a full run with evaluation before and after, and its artifacts.

Writes into run.output_dir: config.yaml, metrics.jsonl, checkpoints/, eval_before.json,
eval_after.json, summary.json, curves.png and samples_before_after.gif.
"""

from __future__ import annotations

import json
import logging
import os
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
from ddrl_scale.telemetry.memory import cuda_peak_memory
from ddrl_scale.train import preemption
from ddrl_scale.train.checkpoint import latest_checkpoint
from ddrl_scale.train.host_checks import check_host
from ddrl_scale.train.metrics import read_metrics
from ddrl_scale.train.report import before_after_gif, plot_curves, write_json
from ddrl_scale.train.trainer import Trainer

logger = logging.getLogger(__name__)


def _before(trainer: Trainer, run_dir: Path) -> tuple[dict, torch.Tensor]:
    """Evaluation of the starting weights, kept on disk so a resumed run reports the true 'before'."""
    json_path, videos_path = run_dir / "eval_before.json", run_dir / "eval_before_videos.safetensors"
    if trainer.step > 0 and json_path.is_file() and videos_path.is_file():
        return json.loads(json_path.read_text()), load_file(str(videos_path))["videos"]
    # every rank: a sharded policy's forward is collective
    result = trainer.run_evaluation("evaluation before")
    trainer.loggers.log_videos("samples/before", result.videos[:8], 0)
    summary = {**result.summary(), "step": trainer.step}  # the step whose weights it evaluated
    if trainer.world.is_main:
        write_json(summary, json_path)
        # atomic, as every run file that a resume reads back (storage/run_files.py)
        atomic_write_bytes(videos_path, save({"videos": result.videos.cpu().contiguous()}))
    return summary, result.videos


def run_training(config: RunConfig) -> dict:
    """Every rank calls; trainer rank 0 writes the artifacts and returns the summary (others: {}).

    With rollout.mode=disaggregated the last rollout.num_ranks ranks serve rollouts instead.
    SIGINT / SIGTERM stop the run with a checkpoint (train/preemption.py): then every rank returns
    {"exit_code": 130 | 143}, rank 0 with "interrupted" and the step to resume from."""
    with preemption.handle_signals():
        try:
            return _run_training(config)
        except preemption.Interrupted as interrupt:  # outside the step loop: the checkpoints on disk
            latest = latest_checkpoint(config.run.output_dir)
            return _interrupted(int(latest.name.split("_")[-1]) if latest else 0, interrupt.exit_code,
                                int(os.environ.get("RANK", "0")) == 0)


def _interrupted(step: int, exit_code: int, main: bool) -> dict:
    return {"steps": step, "interrupted": True, "exit_code": exit_code} if main else \
        {"exit_code": exit_code}


def _run_training(config: RunConfig) -> dict:
    start = time.time()
    check_host(config)  # a missing GPU or backend: one line (exit 2), before anything is built
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
    with preemption.graceful():
        finished = trainer.train()
        # a signal during the last step: the run is checkpointed, the evaluation is left to the rerun
        stop = preemption.StopRequest(run_dir, trainer.world)
        interrupted = stop.requested() and stop.code >= preemption.TERMINATE
    if interrupted or not finished:
        trainer.loggers.close()
        if preemption.exit_code():
            return _interrupted(trainer.step, preemption.exit_code(), main)
        # preempted: checkpointed; the requeued job resumes and reports
        logger.warning("stopped at step %d on a preemption request; resume with the same command",
                       trainer.step)
        return {"steps": trainer.step, "preempted": True} if main else {}
    summary = {"steps": trainer.step, "seconds": round(time.time() - start, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               **{name: round(value, 3) for name, value in cuda_peak_memory().items()},
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}, device {trainer.device}",
               "train_flops_per_sample": flops_per_sample(trainer.engine.model.config),
               "eval_sampler": "ode (fixed prompts and initial noise)", "before": before}
    after = trainer.run_evaluation("evaluation after") if evaluating else None
    if after is not None:
        trainer.loggers.log_videos("samples/after", after.videos[:8], trainer.step)
    trainer.loggers.close()
    if not main:
        return {}
    if after is not None:
        summary["after"] = after.summary()
        write_json(summary["after"], run_dir / "eval_after.json")
        columns = config.train.eval_samples_per_prompt * 4
        labels = (f"before: step {before.get('step', 0)}, reward {before['reward_mean']:.3f}",
                  f"after: step {trainer.step}, reward {summary['after']['reward_mean']:.3f}")
        summary["samples_gif"] = str(before_after_gif(before_videos[:32], after.videos[:32],
                                                      run_dir / "samples_before_after.gif", columns,
                                                      labels))
    if (run_dir / "metrics.jsonl").stat().st_size:
        summary["curves_png"] = str(plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png"))
        lags = [record["policy_lag"] for record in read_metrics(run_dir / "metrics.jsonl")
                if "policy_lag" in record]
        if lags:  # disaggregated rollouts: how stale the trained-on rollouts were, step by step
            summary["policy_lag_histogram"] = {str(int(lag)): lags.count(lag) for lag in sorted(set(lags))}
    write_json(summary, run_dir / "summary.json")
    return summary


def describe(summary: dict, run_dir: str) -> str:
    if summary.get("interrupted"):
        return f"interrupted at step {summary['steps']}; rerun the same command to resume"
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
