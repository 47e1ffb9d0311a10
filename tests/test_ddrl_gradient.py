"""End-to-end DDRL loss on a tiny VideoDiT: autograd vs finite differences, and a golden value.

The loss is built as the trainer builds it (DDRL.md, step 4): policy term from the Flow-GRPO SDE
log-prob of a recorded x_{i+1} against a behaviour log-prob, data term = weighted flow-matching loss
on data, kl term = reverse KL of the SDE mean to a frozen (perturbed) reference model.
"""

import copy

import pytest
import torch

from ddrl_scale import kernels
from ddrl_scale.algo.losses import ddrl_loss, flow_matching_loss, reverse_kl
from ddrl_scale.algo.samplers import sde_step
from ddrl_scale.algo.schedules import add_noise
from ddrl_scale.models.dit import DiTConfig, VideoDiT

CONFIG = DiTConfig(hidden_size=12, depth=1, num_heads=2, num_frames=2, height=4, width=4,
                   patch_size=(1, 2, 2), text_dim=8, max_text_tokens=4, attention_backend="sdpa")
BATCH = 6
SIGMA, SIGMA_NEXT = 0.75, 0.5  # exactly representable: the schedule constants carry no rounding
CLIP_EPS = 0.1
# behaviour log-prob = current log-prob + offset: ratios exp(-offset) = 0.95, 1.05 (inside the
# clip range) and 0.74, 1.35 (outside); with these advantages samples 2, 3 are outside but not
# clipped (gradient flows) and samples 4, 5 are clipped (no gradient)
LOG_PROB_OFFSETS = [0.05, -0.05, 0.3, -0.3, -0.3, 0.3]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
# one scalar in each kind of layer: attention (self and cross), MLP, adaLN, embeddings, final layer
CHOSEN = [
    ("blocks.0.self_attn.query.weight", (0, 0)),
    ("blocks.0.self_attn.value.weight", (3, 1)),
    ("blocks.0.cross_attn.key.weight", (2, 7)),
    ("blocks.0.cross_attn.out.weight", (1, 2)),
    ("blocks.0.mlp.0.weight", (2, 5)),
    ("blocks.0.modulation.1.weight", (4, 4)),
    ("patch_embed.bias", (3,)),
    ("time_embed.0.weight", (1, 1)),
    ("text_embed.2.bias", (0,)),
    ("final_modulation.1.weight", (13, 2)),
    ("final_proj.weight", (0, 0)),
]


def _tiny_setup(dtype, seed=0):
    """Model with its zero-init layers randomised, a frozen perturbed reference, and the batch."""
    torch.manual_seed(seed)
    model = VideoDiT(CONFIG).to(dtype)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.modulation[-1], block.cross_attn.out):
                layer.weight.normal_(0.0, 0.3)
                layer.bias.normal_(0.0, 0.1)
        for layer in (model.final_modulation[-1], model.final_proj):
            layer.weight.normal_(0.0, 0.3)
            layer.bias.normal_(0.0, 0.1)
        reference = copy.deepcopy(model).requires_grad_(False)
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    shape = (BATCH, CONFIG.in_channels, CONFIG.num_frames, CONFIG.height, CONFIG.width)
    batch = {
        "x": torch.randn(shape, dtype=dtype),
        "text": torch.randn(BATCH, CONFIG.max_text_tokens, CONFIG.text_dim, dtype=dtype),
        "x0": torch.randn(shape, dtype=dtype),
        "noise": torch.randn(shape, dtype=dtype),
        "t": torch.tensor([0.2, 0.4, 0.5, 0.6, 0.8, 0.9], dtype=dtype),
        "sigma": torch.full((BATCH,), SIGMA, dtype=dtype),
    }
    with torch.no_grad():  # the rollout: behaviour sample and log-prob, reference mean
        v = model(batch["x"], batch["sigma"], batch["text"])
        batch["prev"], log_prob, _, _ = sde_step(v, batch["x"], SIGMA, SIGMA_NEXT)
        batch["old_log_prob"] = log_prob + torch.tensor(LOG_PROB_OFFSETS)
        v_ref = reference(batch["x"], batch["sigma"], batch["text"])
        _, _, batch["ref_mean"], _ = sde_step(v_ref, batch["x"], SIGMA, SIGMA_NEXT)
    return model, batch


def _ddrl(model, batch, backend: str | None = None):
    """The full DDRL loss: release weights (data_beta 0.01, loss_scale 10) plus kl_beta 1.

    With these weights the three terms contribute gradients of the same order (~1e-3 each on the
    chosen parameters), so a wrong gradient in any one of them fails the comparison. backend: the
    fused kernels' (ddrl_scale.kernels) in place of the algo/ references, as the trainer runs them.
    """
    v = model(batch["x"], batch["sigma"], batch["text"])
    t = batch["t"]
    x_t = add_noise(batch["x0"], batch["noise"], t)
    if backend is None:
        _, log_prob, mean, std = sde_step(v, batch["x"], SIGMA, SIGMA_NEXT, prev_sample=batch["prev"])
        data_loss = flow_matching_loss(model(x_t, t, batch["text"]), batch["x0"], batch["noise"],
                                       weight=(t**2 + 1) / t**2)
    else:
        log_prob, mean, std = kernels.sde_log_prob(v, batch["x"], batch["prev"], SIGMA, SIGMA_NEXT, 0.7,
                                                   backend=backend, return_mean=True, return_std=True)
        data_loss = kernels.flow_matching_loss(model(x_t, t, batch["text"]), batch["x0"], batch["noise"],
                                               weight=(t**2 + 1) / t**2, backend=backend)
    kl = reverse_kl(mean, batch["ref_mean"], std)
    return ddrl_loss(log_prob=log_prob, old_log_prob=batch["old_log_prob"],
                     advantages=torch.tensor(ADVANTAGES), clip_eps=CLIP_EPS, policy_weight=1.0,
                     data_beta=0.01, kl_beta=1.0, loss_scale=10.0, data_loss=data_loss, kl=kl)


def _check_gradients(model, batch, eps, rtol, atol, backend=None):
    parameters = dict(model.named_parameters())
    loss, stats = _ddrl(model, batch, backend)
    # the setup really has ratios != 1, inside and outside the clip range
    assert 0.0 < stats["clip_fraction"].item() < 1.0
    grads = torch.autograd.grad(loss, [parameters[name] for name, _ in CHOSEN])
    for (name, index), grad in zip(CHOSEN, grads):
        parameter = parameters[name]
        with torch.no_grad():
            original = parameter[index].item()
            parameter[index] = original + eps
            plus = _ddrl(model, batch, backend)[0].item()
            parameter[index] = original - eps
            minus = _ddrl(model, batch, backend)[0].item()
            parameter[index] = original
        finite_difference = (plus - minus) / (2 * eps)
        assert grad[index].item() == pytest.approx(finite_difference, rel=rtol, abs=atol), name
    return loss


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP overhead on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", [None, "compile"], ids=["reference", "fused"])
def test_ddrl_gradient_matches_finite_differences_float64(backend):
    """Autograd grads of the full DDRL loss == central differences (eps 1e-6, rtol 1e-4), fp64,
    with the algo/ references and with the fused kernels' custom backward.

    The library keeps float64 tensors in float64 (it only upcasts half precision), so the whole
    graph is float64 and a 1e-6 central difference is accurate.
    """
    model, batch = _tiny_setup(torch.float64)
    loss = _check_gradients(model, batch, eps=1e-6, rtol=1e-4, atol=1e-7, backend=backend)
    assert loss.dtype == torch.float64


# Golden values of the fp32 DDRL loss (and its terms) of `_tiny_setup(torch.float32, seed=0)`. They
# catch numeric regressions anywhere in the model or loss path (init order, sampler, loss formulas).
# Update them ONLY on purpose, after checking that the change of value is intended, and say so in
# the commit message.
GOLDEN_LOSS = 4.07779
GOLDEN_TERMS = {"policy_loss": 0.0848470, "data_loss": 24.0645, "kl": 0.0822869}


@pytest.mark.parametrize("backend", [None, "compile"], ids=["reference", "fused"])
def test_golden_ddrl_loss_fp32(backend):
    """Under torch.manual_seed(0) the fp32 DDRL loss of the tiny setup equals the stored value,
    with the references and with the fused kernels the trainer uses by default on CPU."""
    model, batch = _tiny_setup(torch.float32, seed=0)
    loss, stats = _ddrl(model, batch, backend)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(GOLDEN_LOSS, rel=1e-5)
    for name, value in GOLDEN_TERMS.items():
        assert stats[name].item() == pytest.approx(value, rel=1e-5), name
