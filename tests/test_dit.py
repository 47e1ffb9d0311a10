"""VideoDiT, rotary embedding, attention backend, text encoder and VAE."""

import pytest
import torch
from torch import nn

from ddrl_scale.models import dit as dit_module
from ddrl_scale.models.attention import resolve_backend
from ddrl_scale.models.dit import DiTConfig, VideoDiT, flops_per_sample
from ddrl_scale.models.rope import apply_rope, axis_dims, rope_angles
from ddrl_scale.models.text import HashTextEncoder
from ddrl_scale.models.vae import PixelVAE

CONFIG = DiTConfig(in_channels=3, num_frames=4, height=4, width=6, patch_size=(2, 2, 2),
                   hidden_size=24, depth=2, num_heads=2, text_dim=8, max_text_tokens=5,
                   attention_backend="sdpa")


def _randomise(model, seed=0, scale=0.3):
    """Overwrite every parameter (the zero-init ones included) with random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def _inputs(config=CONFIG, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, config.num_frames, config.height, config.width,
                          generator=generator)
    sigma = torch.rand(batch, generator=generator)
    text = torch.randn(batch, config.max_text_tokens, config.text_dim, generator=generator)
    return latents, sigma, text


def test_patchify_unpatchify_inverse_and_token_order():
    """unpatchify(patchify(x)) == x; token n holds the patch at grid index (t, h, w) row-major."""
    model = VideoDiT(CONFIG)
    latents, _, _ = _inputs()
    tokens = model.patchify(latents)
    assert tokens.shape == (2, CONFIG.num_tokens, 3 * 8)
    assert torch.equal(model.unpatchify(tokens), latents)
    _, gh, gw = CONFIG.grid
    t, h, w = 1, 0, 2
    index = (t * gh + h) * gw + w
    patch = latents[:, :, 2 * t:2 * t + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2].reshape(2, -1)
    assert torch.equal(tokens[:, index], patch)


def test_output_shape_and_zero_init():
    """Output has the latents' shape and is exactly zero at init (adaLN-zero, zero final layer)."""
    model = VideoDiT(CONFIG)
    latents, sigma, text = _inputs()
    out = model(latents, sigma, text)
    assert out.shape == latents.shape
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="expects latents"):
        model(latents[:, :, :2], sigma, text)


def test_text_conditioning_changes_output():
    """With non-zero weights, a different text gives a different output (cross-attention wired)."""
    model = _randomise(VideoDiT(CONFIG)).eval()
    latents, sigma, text = _inputs()
    out = model(latents, sigma, text)
    other = model(latents, sigma, text + torch.randn_like(text))
    assert (out - other).abs().max() > 1e-3
    # and the timestep is wired too
    assert (model(latents, sigma * 0.5, text) - out).abs().max() > 1e-3


def _permuted_outputs(model, latents, sigma, text, permutation):
    tokens = model.patchify(latents)
    permuted_latents = model.unpatchify(tokens[:, permutation])
    out = model.patchify(model(latents, sigma, text))
    out_of_permuted = model.patchify(model(permuted_latents, sigma, text))
    return out[:, permutation], out_of_permuted


def test_rope_makes_model_position_aware():
    """Token permutation: without rotary the DiT is equivariant, with rotary it is not."""
    model = _randomise(VideoDiT(CONFIG)).double().eval()
    latents, sigma, text = (value.double() for value in _inputs())
    permutation = torch.randperm(CONFIG.num_tokens, generator=torch.Generator().manual_seed(0))
    expected, actual = _permuted_outputs(model, latents, sigma, text, permutation)
    assert (expected - actual).abs().max() > 1e-3
    model.rope.zero_()  # control: zero rotation angles remove all position information
    expected, actual = _permuted_outputs(model, latents, sigma, text, permutation)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_flops_per_sample_matches_hook_count():
    """flops_per_sample == 2*in*out*rows over all nn.Linear calls + 4*N*M*dim per attention."""
    model = VideoDiT(CONFIG)
    counted = {"flops": 0.0}

    def linear_hook(module, inputs, output):
        rows = inputs[0].numel() // module.in_features
        counted["flops"] += 2.0 * rows * module.in_features * module.out_features

    def counting_attention(query, key, value, backend="auto"):
        batch, heads, n, head_dim = query.shape
        m = key.shape[2]
        counted["flops"] += 2.0 * 2.0 * batch * heads * n * m * head_dim  # QK^T and AV
        return original_attention(query, key, value, backend)

    handles = [module.register_forward_hook(linear_hook) for module in model.modules()
               if isinstance(module, nn.Linear)]
    original_attention = dit_module.attention
    dit_module.attention = counting_attention
    try:
        batch = 3
        latents, sigma, text = _inputs(batch=batch)
        with torch.no_grad():
            model(latents, sigma, text)
    finally:
        dit_module.attention = original_attention
        for handle in handles:
            handle.remove()
    per_sample = counted["flops"] / batch
    assert flops_per_sample(CONFIG, training=False) == pytest.approx(per_sample, rel=1e-12)
    assert flops_per_sample(CONFIG, training=True) == pytest.approx(3 * per_sample, rel=1e-12)


def test_apply_rope_preserves_norms_and_pairs():
    """Rotation keeps the norm of every consecutive pair (hence of every head vector)."""
    grid, head_dim = (2, 3, 4), 12
    angles = rope_angles(grid, head_dim)
    assert angles.shape == (24, 6)
    assert sum(axis_dims(head_dim)) == head_dim and all(d % 2 == 0 for d in axis_dims(head_dim))
    x = torch.randn(2, 3, 24, head_dim, dtype=torch.float64)
    rotated = apply_rope(x, angles)
    assert rotated.dtype == x.dtype and rotated.shape == x.shape
    pair_norms = x.reshape(2, 3, 24, 6, 2).norm(dim=-1)
    torch.testing.assert_close(rotated.reshape(2, 3, 24, 6, 2).norm(dim=-1), pair_norms,
                               rtol=1e-6, atol=1e-6)
    assert (rotated - x).abs().max() > 1e-2  # it does rotate


def test_rope_relative_position_property():
    """q.k after rotation depends only on the position difference along an axis."""
    grid, head_dim = (1, 1, 8), 12
    angles = rope_angles(grid, head_dim)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    q_rot = apply_rope(q.expand(1, 1, 8, head_dim).contiguous(), angles)[0, 0]
    k_rot = apply_rope(k.expand(1, 1, 8, head_dim).contiguous(), angles)[0, 0]
    scores = q_rot @ k_rot.T  # scores[i, j] for width positions i, j
    for offset in (0, 1, 3):
        diagonal = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=1e-5, atol=1e-5)
    assert (scores[0, 1] - scores[0, 3]).abs() > 1e-3  # but it does depend on the difference
    # also along the frame axis
    angles_t = rope_angles((5, 1, 1), head_dim)
    q_t = apply_rope(q.expand(1, 1, 5, head_dim).contiguous(), angles_t)[0, 0]
    k_t = apply_rope(k.expand(1, 1, 5, head_dim).contiguous(), angles_t)[0, 0]
    scores_t = q_t @ k_t.T
    torch.testing.assert_close(torch.diagonal(scores_t, 2),
                               torch.diagonal(scores_t, 2)[0].expand(3), rtol=1e-5, atol=1e-5)


def test_flash_backend_refused_on_cpu_fp32_mentions_sdpa():
    """Requesting flash where it cannot run is a clear error that points at sdpa."""
    with pytest.raises(RuntimeError, match="sdpa"):
        resolve_backend("flash", torch.device("cpu"), torch.float32)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_backend("sdpa", torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_hash_text_encoder():
    """Deterministic across instances, (B, max_tokens, dim), zero padding, word order matters."""
    prompts = ["a red square on a grey background", "grey square"]
    first = HashTextEncoder(dim=8, max_tokens=10).encode(prompts)
    second = HashTextEncoder(dim=8, max_tokens=10).encode(prompts)
    assert first.shape == (2, 10, 8) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert torch.equal(first[1, 2:], torch.zeros(8, 8))
    assert (first[1, :2].abs().sum(dim=-1) > 0).all()
    # word order matters: "square grey" is not "grey square" with its rows reordered
    swapped = HashTextEncoder(dim=8, max_tokens=10).encode(["square grey"])
    assert not torch.allclose(swapped[0, :2], first[1, :2].flip(0))
    # the same word gets different vectors at different positions ("a" at 0 and 4, "square" at
    # 2 and 1) and the same vector at the same position in another prompt
    assert not torch.allclose(first[0, 0], first[0, 4])
    assert not torch.allclose(first[0, 2], first[1, 1])
    assert torch.equal(HashTextEncoder(8, 10).encode(["square"])[0, 0], swapped[0, 0])
    truncated = HashTextEncoder(dim=8, max_tokens=3).encode(["one two three four five"])
    assert truncated.shape == (1, 3, 8)


def test_pixel_vae_round_trip():
    """decode(encode(v)) == v for v in [0, 1]; latents span [-1, 1]; decode clamps."""
    vae = PixelVAE()
    videos = torch.rand(2, 3, 2, 4, 4)
    videos[0, 0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    latents = vae.encode(videos)
    assert latents.min() >= -1.0 and latents.max() <= 1.0
    assert latents[0, 0, 0, 0, 0] == -1.0 and latents[0, 0, 0, 0, 1] == 1.0
    torch.testing.assert_close(vae.decode(latents), videos, rtol=0, atol=1e-7)
    assert vae.decode(torch.tensor([-3.0, 3.0]).bfloat16()).tolist() == [0.0, 1.0]
