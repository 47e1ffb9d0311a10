"""The release's optimizer options: the power EMA (optim.ema_kind=power) and forced-finite gradients
(optim.force_finite_grads), each against its definition, on the engines that run them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.config.schema import OptimSection, ParallelSection
from ddrl_scale.parallel import build_engine
from ddrl_scale.parallel.distributed import World
from ddrl_scale.parallel.ema import ema_decay_at, power_ema_exponent


def test_power_ema_exponent_solves_edm2s_polynomial():
    for rate in (0.05, 0.1, 0.2):
        gamma = power_ema_exponent(rate)
        # EDM2: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))
        assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(rate**2, rel=1e-9)
        assert np.polyval([1, 7, 16 - rate**-2, 12 - rate**-2], gamma) == pytest.approx(0, abs=1e-6)
    optim = OptimSection(ema_kind="power", ema_rate=0.1)
    gamma = power_ema_exponent(0.1)
    assert ema_decay_at(optim, 0) == 0.0
    for it in (1, 5, 100):
        assert ema_decay_at(optim, it) == pytest.approx((1 - 1 / (it + 1)) ** (gamma + 1))
    assert ema_decay_at(OptimSection(ema_decay=0.9), 7) == 0.9


def _engine(**optim):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6.0).reshape(2, 3) / 10)
        model.bias.zero_()
    return build_engine(model, OptimSection(lr=0.1, grad_clip=0.0, **optim), ParallelSection(), World())


def test_power_ema_follows_its_decay_per_step_and_resumes(tmp_path):
    engine = _engine(ema_kind="power", ema_rate=0.1)
    expected = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    for it in range(4):
        engine.forward(torch.ones(1, 3)).sum().backward()
        engine.step()
        decay = ema_decay_at(engine.optim, it)
        for name, param in engine.model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * param.detach()
    for name in expected:
        torch.testing.assert_close(engine.ema.shadow[name], expected[name])
    engine.save(tmp_path)  # the schedule's step count carries the EMA's iteration over a resume
    again = _engine(ema_kind="power", ema_rate=0.1)
    again.load(tmp_path)
    assert again.schedule.last_epoch == engine.schedule.last_epoch == 4


def test_force_finite_grads_zeroes_and_counts_non_finite_elements():
    engine = _engine(force_finite_grads=True)
    before = engine.model.weight.detach().clone()
    engine.forward(torch.ones(1, 3)).sum().backward()
    engine.model.weight.grad[0, 1] = float("nan")
    engine.model.bias.grad[1] = float("inf")
    norm = engine.step()
    assert engine.nonfinite == 2 and math.isfinite(norm)
    assert torch.isfinite(engine.model.weight).all()
    assert engine.model.weight[0, 1] != before[0, 1]  # AdamW's weight decay still moved it
    off = _engine()
    off.forward(torch.ones(1, 3)).sum().backward()
    off.model.weight.grad[0, 1] = float("nan")
    off.step()
    assert off.nonfinite == 0 and torch.isnan(off.model.weight).any()  # the default leaves them


def test_release_optim_config_errors():
    with pytest.raises(ConfigError, match="optim.ema_kind"):
        load_config(None, ["optim.ema_kind=karras"])
    with pytest.raises(ConfigError, match="optim.ema_rate"):
        load_config(None, ["optim.ema_kind=power", "optim.ema_rate=0.5"])
    with pytest.raises(ConfigError, match="optim.force_finite_grads"):
        load_config(None, ["optim.force_finite_grads=true", "parallel.engine=deepspeed"])


def _run(overrides, out, steps):
    from ddrl_scale.train.metrics import read_metrics
    from ddrl_scale.train.run import run_training

    config = load_config(None, [*overrides, "train.eval_prompts=0", f"run.output_dir={out}",
                                f"train.steps={steps}", "train.resume=auto"])
    run_training(config)
    return read_metrics(out / "metrics.jsonl")


def test_update_ref_every_makes_the_kl_zero_right_after_a_copy(tiny_overrides, tmp_path):
    kl = ["algo.kl_beta=0.1"]
    copied = _run([*tiny_overrides, *kl, "algo.update_ref_every=1"], tmp_path / "a", 3)
    frozen = _run([*tiny_overrides, *kl], tmp_path / "b", 3)
    assert copied[0]["kl"] == frozen[0]["kl"] == 0.0  # step 1: reference == starting policy
    assert all(record["kl"] == 0.0 for record in copied)  # copied after every step: fp32, exact
    assert frozen[1]["kl"] > 0 and frozen[2]["kl"] > 0


def test_rollouts_from_the_reference_are_off_policy(tiny_overrides, tmp_path):
    records = _run([*tiny_overrides, "rollout.from_reference=true"], tmp_path / "a", 3)
    assert records[0]["ratio_max_dev"] == 0.0  # the reference is the starting policy
    assert records[1]["ratio_max_dev"] > 0 and records[2]["ratio_max_dev"] > 0
    with_copy = _run([*tiny_overrides, "rollout.from_reference=true", "algo.update_ref_every=1"],
                     tmp_path / "b", 3)
    assert all(record["ratio_max_dev"] == 0.0 for record in with_copy)  # on-policy again


def test_the_updated_reference_resumes_exactly(tiny_overrides, tmp_path):
    extra = [*tiny_overrides, "algo.kl_beta=0.1", "algo.update_ref_every=3", "train.save_every=1"]
    whole = _run(extra, tmp_path / "a", 5)
    _run(extra, tmp_path / "b", 4)
    resumed = _run(extra, tmp_path / "b", 5)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["kl"] for r in whole] == [r["kl"] for r in resumed]
    assert whole[3]["kl"] == 0.0 and whole[4]["kl"] > 0  # copied after step 3


def test_reference_option_errors():
    with pytest.raises(ConfigError, match="algo.update_ref_every"):
        load_config(None, ["algo.update_ref_every=2"])  # kl_beta 0, on-policy: nothing uses it
    with pytest.raises(ConfigError, match="rollout.from_reference"):
        load_config(None, ["rollout.from_reference=true", "rollout.mode=disaggregated"])
