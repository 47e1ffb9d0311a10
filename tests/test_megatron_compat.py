"""The megatron-core CPU compatibility layer: on where torch has no CUDA, absent where it has."""

import pytest
import torch

from ddrl_scale.parallel import megatron_compat


@pytest.fixture(autouse=True)
def restore():
    yield
    megatron_compat.disable()


def test_enable_maps_cuda_calls_to_cpu_on_a_cpu_torch(monkeypatch):
    """On a CPU-only torch, current_device and the RNG state calls act on the CPU; disable restores."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    original = torch.cuda.current_device
    replaced = megatron_compat.enable()
    assert replaced == ["current_device", "get_rng_state", "manual_seed", "set_rng_state"]
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.manual_seed(3)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)  # the tracker's save/restore round-trips the CPU RNG
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    megatron_compat.disable()
    assert torch.cuda.current_device is original


def test_enable_does_nothing_where_cuda_exists(monkeypatch):
    """With CUDA available the layer changes nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = torch.cuda.current_device
    assert megatron_compat.enable() == []
    assert torch.cuda.current_device is original
