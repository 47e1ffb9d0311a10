"""`ddrl experiment hacking --quick`: the three methods differ only in their loss weights."""

import json

import pytest
import torch

from ddrl_scale.experiments.hacking import METHODS, Setting, run_experiment
from ddrl_scale.experiments.hacking_report import write_report
from ddrl_scale.experiments.measures import frechet_distance, video_features, within_prompt_diversity


@pytest.fixture(scope="module")
def quick(tmp_path_factory, shared_shards_dir):
    out = tmp_path_factory.mktemp("hacking")
    overrides = [f"data.generated_dir={shared_shards_dir}", "data.num_generated=64",
                 "data.samples_per_shard=32"]
    result = run_experiment(Setting.quick(), overrides, out)
    return result, out


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def test_methods_differ_only_in_loss_weights(quick):
    """The resolved configs of the three runs differ in algo.data_beta / algo.kl_beta only."""
    result, _ = quick
    configs = {run["method"]: _flatten(run["config"]) for run in result["runs"]}
    assert set(configs) == set(METHODS)
    reference = configs["ddrl"]
    for method, config in configs.items():
        differing = {k for k in config if config[k] != reference[k] and k != "run.output_dir"}
        assert differing <= {"algo.data_beta", "algo.kl_beta"}, (method, differing)
    assert configs["ddrl"]["algo.data_beta"] > 0 and configs["flow_grpo"]["algo.kl_beta"] > 0
    assert configs["reward_only"]["algo.data_beta"] == configs["reward_only"]["algo.kl_beta"] == 0


def test_same_data_and_rollouts_at_step_zero(quick):
    """All three methods see the same anchor items and identical first rollouts and rewards."""
    result, _ = quick
    first = [run["first_rollout"] for run in result["runs"]]
    for other in first[1:]:
        assert other["keys"] == first[0]["keys"] and other["prompts"] == first[0]["prompts"]
        assert torch.equal(other["final"], first[0]["final"])
        assert torch.equal(other["rewards"], first[0]["rewards"])
    starts = [run["history"][0] for run in result["runs"]]
    assert all(start == starts[0] for start in starts)  # step-0 measures of the same base model


def test_report_is_written(quick, tmp_path):
    """results.json, both plots and report.md with a row per method."""
    result, _ = quick
    report = write_report(result, tmp_path, "ddrl experiment hacking --quick")
    text = report.read_text()
    for method in METHODS:
        assert f"| {method} |" in text
    for name in ("results.json", "reward_vs_data_fit.png", "measures_by_step.png"):
        assert (tmp_path / name).stat().st_size > 0
    stored = json.loads((tmp_path / "results.json").read_text())
    assert {run["method"] for run in stored["runs"]} == set(METHODS)


def test_frechet_distance_against_closed_form():
    """Frechet distance of two Gaussians with diagonal covariances: |mu|^2 + sum (s_a - s_b)^2."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5])
    b = b + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = 1.0 + (1.0 - 2.0) ** 2 + (2.0 - 1.0) ** 2 + 0.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_diversity_and_features():
    """Identical samples have zero diversity; distinct ones the RMS distance; features are finite."""
    same = torch.rand(1, 3, 4, 8, 8).repeat(3, 1, 1, 1, 1)
    assert within_prompt_diversity(same, 3) == pytest.approx(0.0, abs=1e-6)
    two = torch.stack([torch.zeros(3, 4, 8, 8), torch.full((3, 4, 8, 8), 0.5)])
    assert within_prompt_diversity(two, 2) == pytest.approx(0.5, rel=1e-5)
    features = video_features(torch.rand(5, 3, 4, 8, 8))
    assert features.shape == (5, 8) and torch.isfinite(features).all()
