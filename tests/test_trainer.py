"""End-to-end tests of the DDRL trainer on a tiny config: artifacts, exact resume, the baseline configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ddrl_scale.algo.losses import ddrl_loss
from ddrl_scale.config import load_config
from ddrl_scale.train.checkpoint import read_weights
from ddrl_scale.train.metrics import read_metrics
from ddrl_scale.train.run import run_training
from ddrl_scale.train.trainer import Trainer

CURVE_KEYS = ("reward_mean", "policy_loss", "data_loss")


def _train(overrides: list[str]) -> Trainer:
    """Build a Trainer, resume as configured and run its loop (no evaluation)."""
    trainer = Trainer(load_config(None, overrides))
    trainer.maybe_resume()
    trainer.train()
    return trainer


def _weights(run_dir: Path, step: int, name: str = "model") -> dict[str, torch.Tensor]:
    return read_weights(run_dir / "checkpoints" / f"step_{step:06d}", ema=name == "ema")


def test_run_training_writes_all_artifacts(tiny_overrides):
    """A 3-step run_training writes every artifact, 3 metrics lines, and on-policy ratio exactly 1."""
    config = load_config(None, tiny_overrides)
    summary = run_training(config)
    run_dir = Path(config.run.output_dir)
    for name in ("config.yaml", "metrics.jsonl", "eval_before.json", "eval_after.json", "summary.json",
                 "curves.png", "samples_before_after.gif", "checkpoints/step_000003/engine/.metadata",
                 "checkpoints/step_000003/trainer_state.pt", "checkpoints/step_000003/rng_rank0.pt",
                 "checkpoints/step_000003/engine_schedule.pt"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert load_config(run_dir / "config.yaml") == config
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert set(CURVE_KEYS) <= set(record)
        assert all(isinstance(record[key], float) for key in CURVE_KEYS)
        assert record["ratio_max_dev"] == 0.0  # fp32, on-policy: log p_theta == log p_old bitwise
        assert record["clip_fraction"] == 0.0
    assert summary["steps"] == 3
    stored = json.loads((run_dir / "summary.json").read_text())
    assert stored["before"] == json.loads((run_dir / "eval_before.json").read_text())
    assert stored["after"] == json.loads((run_dir / "eval_after.json").read_text())
    assert stored["after"]["num_samples"] == 2


def test_resume_is_exact(tiny_overrides, tmp_path):
    """4 steps in one go == 2 steps, then a new run resuming to 4: bitwise weights, equal metrics."""
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    _train([*tiny_overrides, "train.eval_prompts=0", f"run.output_dir={dir_a}", "train.steps=4"])
    # B goes through run_training (with its evaluations) twice: they must not perturb the training RNG
    first = run_training(load_config(None, [*tiny_overrides, f"run.output_dir={dir_b}", "train.steps=2"]))
    second = run_training(load_config(None, [*tiny_overrides, f"run.output_dir={dir_b}", "train.steps=4",
                                             "train.resume=auto"]))
    assert (first["steps"], second["steps"]) == (2, 4)
    assert second["before"] == first["before"]  # the resumed run reports the true starting point
    for name in ("model", "ema"):
        a, b = _weights(dir_a, 4, name), _weights(dir_b, 4, name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
        assert not all(torch.equal(a[key], _weights(dir_b, 2, name)[key]) for key in a)  # it trained
    metrics_a, metrics_b = read_metrics(dir_a / "metrics.jsonl"), read_metrics(dir_b / "metrics.jsonl")
    assert [r["step"] for r in metrics_b] == [1, 2, 3, 4]
    for record_a, record_b in zip(metrics_a, metrics_b, strict=True):
        assert {k: record_a[k] for k in CURVE_KEYS} == {k: record_b[k] for k in CURVE_KEYS}
        assert record_a["grad_norm"] == record_b["grad_norm"]


def test_resume_from_missing_checkpoint_names_path(tiny_overrides, tmp_path):
    """train.resume pointing at a missing checkpoint folder fails, naming it, before any training."""
    missing = tmp_path / "nowhere" / "step_000007"
    config = load_config(None, [*tiny_overrides, f"train.resume={missing}"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        run_training(config)
    assert not (Path(config.run.output_dir) / "metrics.jsonl").exists()


def test_flow_grpo_config_logs_kl_without_data_term(tiny_overrides):
    """Flow-GRPO (data_beta=0, kl_beta=0.1): kl is logged (0 before the first update), no data term."""
    trainer = _train([*tiny_overrides, "algo.data_beta=0", "algo.kl_beta=0.1", "train.steps=2"])
    assert type(trainer) is Trainer and trainer.loss_fn is ddrl_loss
    assert trainer.reference is not None
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert "kl" in record and "data_loss" not in record
        assert record["loss"] == pytest.approx(10.0 * (record["policy_loss"] + 0.1 * record["kl"]),
                                               rel=1e-5, abs=1e-9)
    assert records[0]["kl"] == 0.0  # the policy still equals its frozen reference
    assert records[1]["kl"] > 0.0


def test_ddrl_loss_holds_data_term(tiny_overrides):
    """DDRL (the default): the logged loss is loss_scale * (policy + data_beta * data), no kl reference."""
    trainer = _train([*tiny_overrides, "train.steps=1"])
    assert trainer.reference is None
    (record,) = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert "kl" not in record and record["data_loss"] > 0
    assert record["loss"] == pytest.approx(10.0 * (record["policy_loss"] + 0.01 * record["data_loss"]),
                                           rel=1e-5, abs=1e-9)


def test_sft_config_runs(tiny_overrides):
    """SFT (policy_weight=0): the same Trainer runs, and the loss is the data term alone."""
    trainer = _train([*tiny_overrides, "algo.policy_weight=0", "train.steps=2"])
    assert type(trainer) is Trainer and trainer.loss_fn is ddrl_loss
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["loss"] == pytest.approx(10.0 * 0.01 * record["data_loss"], rel=1e-5)
        assert record["grad_norm"] > 0


def test_baselines_see_same_first_rollouts(tiny_overrides, tmp_path):
    """Same seed: DDRL, Flow-GRPO and reward-only score identical rollouts at step 0."""
    variants = {"ddrl": [], "flow_grpo": ["algo.data_beta=0", "algo.kl_beta=0.1"],
                "reward_only": ["algo.data_beta=0", "algo.kl_beta=0"]}
    first = {}
    for name, extra in variants.items():
        trainer = _train([*tiny_overrides, *extra, "train.steps=1", f"run.output_dir={tmp_path / name}"])
        (first[name],) = read_metrics(trainer.run_dir / "metrics.jsonl")
    rewards = {name: (r["reward_mean"], r["reward_std"], r["policy_loss"]) for name, r in first.items()}
    assert len(set(rewards.values())) == 1, rewards


def test_same_noise_per_group_starts_each_group_from_one_noise(tiny_overrides):
    """algo.same_noise_per_group: the members of a group share their initial noise; groups differ."""
    trainer = Trainer(load_config(None, [*tiny_overrides, "algo.same_noise_per_group=true"]))
    rollouts = trainer.rollout(trainer.next_batch())
    noise = rollouts.trajectory.initial_noise  # (prompts * G, ...), group by group
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3])
    assert not torch.equal(noise[0], noise[2])
    assert not torch.equal(rollouts.trajectory.final[0], rollouts.trajectory.final[1])  # SDE noise


def test_data_term_can_reuse_the_rollout_sigma_and_noise(tiny_overrides):
    """algo.data_reuse_rollout_noise: the data term is the flow-matching loss at the trained step's
    sigma and the group's initial noise (checked against a direct computation)."""
    from ddrl_scale.algo.losses import flow_matching_loss
    from ddrl_scale.algo.schedules import add_noise

    trainer = Trainer(load_config(None, [*tiny_overrides, "algo.data_reuse_rollout_noise=true"]))
    batch = trainer.next_batch()
    rollouts = trainer.rollout(batch)
    index = trainer.trained_steps()[1]
    got = trainer.data_loss(batch, rollouts, index)
    noise = rollouts.trajectory.initial_noise[:: trainer.config.algo.group_size]
    sigma = torch.full((noise.shape[0],), float(trainer.sigmas[index]))
    with torch.no_grad():
        v = trainer.engine.model(add_noise(batch.latents, noise, sigma), sigma,
                                 trainer.encode_text(batch.captions))
    torch.testing.assert_close(got.detach(), flow_matching_loss(v, batch.latents, noise))


def test_data_on_first_only_computes_the_data_term_once(tiny_overrides, monkeypatch):
    """algo.data_on_first_only: one data-term forward per iteration instead of one per trained step."""
    calls = []
    for flag, expected in (("false", None), ("true", 1)):
        trainer = Trainer(load_config(None, [*tiny_overrides, f"algo.data_on_first_only={flag}"]))
        original = trainer.data_loss
        counted = []
        monkeypatch.setattr(trainer, "data_loss", lambda *a, c=counted, o=original: c.append(1) or o(*a))
        trainer.iteration()
        calls.append(len(counted))
        if expected is not None:
            assert len(counted) == expected
    assert calls[0] == len(Trainer(load_config(None, tiny_overrides)).trained_steps()) > 1


def test_preemption_request_checkpoints_and_stops_then_resumes(tiny_overrides):
    """RUN_DIR/.preempt_requested (or SIGUSR1): stop after the current step with a checkpoint;
    the next run resumes there and the metrics hold every step once."""
    import os
    import signal

    config = load_config(None, tiny_overrides)
    run_dir = Path(config.run.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / ".preempt_requested").touch()
    first = Trainer(config)
    assert first.train() is False and first.step == 1
    assert (run_dir / "checkpoints" / "step_000001" / "trainer_state.pt").is_file()

    (run_dir / ".preempt_requested").unlink()  # the requeued job's script removes it
    second = Trainer(config)
    second.maybe_resume()
    assert second.step == 1
    original = signal.getsignal(signal.SIGUSR1)
    try:
        def signal_during_step(*args, done=[]):  # noqa: B006  (a one-shot flag)
            result = Trainer.iteration(second)
            if not done:
                done.append(os.kill(os.getpid(), signal.SIGUSR1))
            return result

        second.iteration = signal_during_step
        assert second.train() is False and second.step == 2  # the signal stopped it after step 2
    finally:
        signal.signal(signal.SIGUSR1, original)
    third = Trainer(config)
    third.maybe_resume()
    assert third.train() is True and third.step == config.train.steps
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert not (run_dir / ".preempt_requested").exists()


def test_fused_kernels_train_like_the_references(tiny_overrides, tmp_path):
    """The default CPU path (kernels.backend=auto -> the compiled fused kernels) and the eager
    references give the same losses (rel 1e-5: only the summation order differs); with the KL term
    on too, and the on-policy ratio stays exactly 1 with either."""
    runs = {}
    for backend in ("auto", "torch"):
        overrides = [*tiny_overrides, f"kernels.backend={backend}", "algo.kl_beta=0.1",
                     f"run.output_dir={tmp_path / backend}"]
        trainer = _train(overrides)
        assert trainer.kernel_backend == ("compile" if backend == "auto" else "torch")
        runs[backend] = read_metrics(tmp_path / backend / "metrics.jsonl")
    for fused, reference in zip(runs["auto"], runs["torch"]):
        for key in ("loss", "policy_loss", "data_loss", "kl", "grad_norm", "reward_mean"):
            assert fused[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
        assert fused["ratio_max_dev"] == 0.0 and reference["ratio_max_dev"] == 0.0
    assert runs["auto"][0]["kl"] == 0.0  # the step-0 policy is the reference, kernel for kernel
