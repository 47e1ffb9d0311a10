"""The GPU recipes in configs/: they load with the config schema, satisfy what the Wan adapter and
the trainer require of a run, and the memory per GPU their comments promise is what `ddrl plan`
computes for them today (so the comments cannot drift from the planner)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from ddrl_scale.config import load_config
from ddrl_scale.telemetry.plan_cli import main as plan_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# recipe -> the GPU its comment's plan was computed for
# the 1.3B recipe is the release preset, whose data term over all rollout samples needs an H200
RECIPES = {"wan2.1_t2v_1.3b_8gpu.yaml": "h200", "wan2.1_t2v_14b_16node.yaml": "h200"}
PIXELS = ["--frames", "81", "--height", "480", "--width", "832", "--vae-compression", "4,8,8"]


def test_every_wan_recipe_is_listed():
    assert sorted(path.name for path in CONFIGS.glob("wan2.1_*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_fits_the_wan_adapter(name):
    config = load_config(CONFIGS / name)
    world = config.launch.nodes * config.launch.nproc_per_node
    assert config.model.kind == "diffusers_wan" and config.model.pretrained
    assert config.parallel.engine == "fsdp2" and config.parallel.cp == 1  # as ddrl plan chose
    assert config.algo.prompts_per_step % world == 0  # every rank holds whole prompt groups
    assert list(config.model.patch_size) == [1, 2, 2] and config.model.text_dim == 4096
    assert config.video.channels == 16  # AutoencoderKLWan latents
    assert config.model.hidden_size % config.model.num_heads == 0


def _planned(name: str, gpu: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plan_main(["--config", str(CONFIGS / name), "--gpu", gpu, *PIXELS, "--top", "1",
                          "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_comment_memory_matches_ddrl_plan(name):
    """The recipe's 'Expected memory per GPU ... : X GB' is the best plan's peak, and that plan is
    the one the recipe configures (FSDP over all ranks with activation checkpointing)."""
    text = (CONFIGS / name).read_text()
    match = re.search(r"Expected memory per GPU \(ddrl plan, [^)]*\): ([0-9.]+) GB", text)
    assert match, f"{name}: no 'Expected memory per GPU (ddrl plan, ...): X GB' comment"
    config = load_config(CONFIGS / name)
    result = _planned(name, RECIPES[name])
    best = result["plans"][0]
    world = config.launch.nodes * config.launch.nproc_per_node
    assert best["feasible"] and best["cp"] == 1 and best["tp"] == 1 and best["shard"] == world
    assert best["activation_checkpointing"] == config.parallel.activation_checkpointing
    assert best["memory_gb"]["total"] == pytest.approx(float(match.group(1)), abs=0.01)
