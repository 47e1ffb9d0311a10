"""Options applied from outside the model, checked against the plain model in one process:
activation checkpointing, per-block compile, and the generated DeepSpeed config."""

import json
import time

import pytest
import torch

from ddrl_scale.config import load_config
from ddrl_scale.models.dit import DiTConfig, VideoDiT
from ddrl_scale.parallel.deepspeed_engine import deepspeed_config
from ddrl_scale.parallel.parallelize import apply_activation_checkpointing, apply_compile

TINY = DiTConfig(hidden_size=12, depth=2, num_heads=2, num_frames=4, height=8, width=8,
                 patch_size=(2, 4, 4), text_dim=8, max_text_tokens=4)


def _loss_and_grads(model):
    torch.manual_seed(1)
    x, sigma, text = torch.randn(2, 3, 4, 8, 8), torch.rand(2), torch.randn(2, 4, 8)
    loss = model(x, sigma, text).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _pair():
    torch.manual_seed(0)
    plain = VideoDiT(TINY)
    for p in plain.parameters():  # leave zero-init behind so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.2)
    other = VideoDiT(TINY)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing block activations changes neither the loss nor any gradient."""
    plain, checkpointed = _pair()
    apply_activation_checkpointing(checkpointed)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(checkpointed)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """torch.compile on each block (slow: a cold compile takes ~30 s on 2 cores) matches eager."""
    plain, compiled = _pair()
    apply_compile(compiled)
    start = time.time()
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(compiled)
    print(f"compile + run: {time.time() - start:.1f} s")
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_deepspeed_config_follows_ours_and_merges_the_user_json(tmp_path):
    """The generated config carries our optimizer, clip, precision and ZeRO stage; a user JSON
    overrides them key by key, except the batch-size keys, which follow the run."""
    config = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                                "optim.lr=2e-5", "optim.grad_clip=0.5", "run.dtype=bf16"])
    generated = deepspeed_config(config.optim, config.parallel, "bf16", world_size=4,
                                 accumulation_steps=5)
    assert generated["zero_optimization"] == {"stage": 3}
    assert generated["optimizer"]["params"]["lr"] == 2e-5
    assert generated["gradient_clipping"] == 0.5 and generated["bf16"] == {"enabled": True}
    assert generated["gradient_accumulation_steps"] == 5 and generated["train_batch_size"] == 20

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000},
                                "gradient_clipping": 2.0, "train_batch_size": 999}))
    config = load_config(None, ["parallel.engine=deepspeed", f"parallel.deepspeed_config={user}"])
    merged = deepspeed_config(config.optim, config.parallel, "fp32", world_size=2, accumulation_steps=5)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert merged["gradient_clipping"] == 2.0
    assert merged["train_batch_size"] == 10  # the run's, not the file's


def test_deepspeed_config_errors_name_the_file(tmp_path):
    """A missing or malformed user JSON is an error naming parallel.deepspeed_config and the path."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, match in ((tmp_path / "missing.json", "does not exist"), (bad, "not valid JSON")):
        config = load_config(None, ["parallel.engine=deepspeed", f"parallel.deepspeed_config={path}"])
        with pytest.raises((FileNotFoundError, ValueError), match=match):
            deepspeed_config(config.optim, config.parallel, "fp32", world_size=1, accumulation_steps=1)
