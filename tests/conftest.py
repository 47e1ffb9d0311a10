"""Shared fixtures: a tiny, fast run configuration whose demo shards are generated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU only through its interpreter, and triton reads TRITON_INTERPRET when it
# is first imported (torch.compile imports it): set it here, before any test module runs
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Everything a run needs, shrunk so that a few optimizer steps take well under a second on one CPU core.
_TINY = [
    "model.init_checkpoint=none",
    "model.hidden_size=12",
    "model.depth=1",
    "model.num_heads=2",
    "model.text_dim=8",
    "model.max_text_tokens=12",
    "model.patch_size=[2,4,4]",
    "video.num_frames=4",
    "video.height=8",
    "video.width=8",
    "sampler.num_steps=4",
    "algo.group_size=2",
    "algo.prompts_per_step=2",
    "data.num_generated=16",
    "data.samples_per_shard=8",
    "data.shuffle_buffer=4",
    "train.steps=3",
    "train.eval_prompts=2",
    "train.eval_samples_per_prompt=1",
    "train.progress=false",
]


@pytest.fixture(scope="session")
def shared_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of generated demo shards for the whole session (write_demo_shards reuses it)."""
    return tmp_path_factory.mktemp("shared") / "shards"


@pytest.fixture
def tiny_overrides(tmp_path: Path, shared_shards_dir: Path) -> list[str]:
    """key=value overrides for a very small run writing into tmp_path/run (shards shared)."""
    return [*_TINY, f"data.generated_dir={shared_shards_dir}", f"run.output_dir={tmp_path / 'run'}"]
