"""`ddrl ckpt export`: a checkpoint consolidates into one safetensors file that starts a new run."""

import pytest
import torch
from safetensors.torch import load_file

from ddrl_scale.config import load_config
from ddrl_scale.models import build_model
from ddrl_scale.train.checkpoint import latest_checkpoint, read_weights
from ddrl_scale.train.export import export_checkpoint
from ddrl_scale.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_shards_dir):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    overrides = [
        "model.init_checkpoint=none", "model.hidden_size=12", "model.depth=1", "model.num_heads=2",
        "model.text_dim=8", "video.num_frames=4", "video.height=8", "video.width=8",
        "model.patch_size=[2,4,4]", "sampler.num_steps=4", "algo.group_size=2",
        "algo.prompts_per_step=2", "data.num_generated=16", "data.samples_per_shard=8",
        "data.shuffle_buffer=4", f"data.generated_dir={shared_shards_dir}", "train.steps=2",
        "train.eval_prompts=0", "train.progress=false", f"run.output_dir={run_dir}"]
    Trainer(load_config(None, overrides)).train()
    return run_dir, overrides


@pytest.mark.parametrize("ema", [False, True])
def test_export_equals_checkpoint_weights(trained_run, tmp_path, ema):
    """The exported file holds exactly the checkpoint's model (or EMA) tensors."""
    run_dir, _ = trained_run
    out = export_checkpoint(run_dir, tmp_path / "policy.safetensors", ema=ema)
    exported, stored = load_file(str(out)), read_weights(latest_checkpoint(run_dir), ema=ema)
    assert exported.keys() == stored.keys()
    for name in stored:
        assert torch.equal(exported[name], stored[name]), name


def test_export_loads_as_init_checkpoint(trained_run, tmp_path):
    """model.init_checkpoint=<export> builds a policy equal to the trained one."""
    run_dir, overrides = trained_run
    out = export_checkpoint(run_dir, tmp_path / "policy.safetensors")
    model = build_model(load_config(None, overrides + [f"model.init_checkpoint={out}"]))
    stored = read_weights(latest_checkpoint(run_dir))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_export_bf16_and_bad_path(trained_run, tmp_path):
    """--dtype bf16 casts every tensor; a folder without checkpoints is a clear error."""
    run_dir, _ = trained_run
    out = export_checkpoint(run_dir, tmp_path / "policy.safetensors", dtype="bf16")
    assert {tensor.dtype for tensor in load_file(str(out)).values()} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "x.safetensors")
