"""`ddrl pretrain` on the engines: it learns, saves EMA weights the DiT loads, and resumes exactly."""

import json
import shutil

import pytest
import torch
from conftest import _TINY
from safetensors import safe_open
from safetensors.torch import load_file

from ddrl_scale.config import load_config
from ddrl_scale.models import build_model
from ddrl_scale.train.pretrain import pretrain


def _config(tmp_path, shards, *extra):
    return load_config(None, [*_TINY, f"data.generated_dir={shards}", "pretrain.batch_size=4",
                              f"pretrain.output={tmp_path / 'pre' / 'base.safetensors'}", *extra])


def test_pretrain_writes_loadable_ema_weights_with_provenance(tmp_path, shared_shards_dir):
    """The output loads as model.init_checkpoint and records the command and its final loss."""
    config = _config(tmp_path, shared_shards_dir, "pretrain.steps=3")
    path = pretrain(config)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert "ddrl pretrain pretrain.steps=3" in json.loads(metadata["made_by"])
    assert json.loads(metadata["final_train_loss"]) > 0
    model = build_model(load_config(None, [*_TINY, f"model.init_checkpoint={path}"]))
    assert torch.equal(model.state_dict()["final_proj.weight"], load_file(path)["final_proj.weight"])


def test_pretrain_loss_decreases(tmp_path, shared_shards_dir, caplog):
    """40 steps of flow matching lower the training loss of the tiny DiT (first vs last 10 steps)."""
    import ddrl_scale.train.pretrain as module
    from ddrl_scale.parallel.distributed import reduce_metrics  # noqa: F401  (same module path)

    losses = []
    original = module.flow_matching_loss

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        losses.append(out.mean().item())
        return out

    module.flow_matching_loss = recording
    try:
        pretrain(_config(tmp_path, shared_shards_dir, "pretrain.steps=40", "pretrain.lr=3e-3"))
    finally:
        module.flow_matching_loss = original
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), losses


def test_pretrain_resume_is_exact(tmp_path, shared_shards_dir):
    """A run restarted from its step-2 checkpoint ends bitwise equal to the uninterrupted run."""
    straight = pretrain(_config(tmp_path / "a", shared_shards_dir, "pretrain.steps=4",
                                "pretrain.save_every=2"))
    # the restarted run finds only the step-2 checkpoint (as after a crash before step 4)
    shutil.copytree(tmp_path / "a" / "pre" / "checkpoints" / "step_000002",
                    tmp_path / "b" / "pre" / "checkpoints" / "step_000002")
    resumed = pretrain(_config(tmp_path / "b", shared_shards_dir, "pretrain.steps=4"))
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("key", ["pretrain.batch_size=0", "pretrain.ema_decay=1.0"])
def test_pretrain_bad_settings_name_the_key(key):
    from ddrl_scale.config import ConfigError

    with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
        load_config(None, [key])
