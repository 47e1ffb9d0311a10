"""The tensor-parallel rollout copy (parallel/inference_tp.py) against the plain VideoDiT in one
process: 2 gloo ranks load whole published tensors into their shards and must compute the plain
model's velocity (row-parallel sums reorder float additions: rtol 1e-5, atol 1e-5; measured max
difference 1.5e-6), and gather back exactly the tensors they were given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddrl_scale.config import ConfigError
from ddrl_scale.models.dit import DiTConfig, VideoDiT
from ddrl_scale.parallel.inference_tp import (
    full_parameters,
    load_full,
    local_parameter_count,
    shard_inference_copy,
)
from ddrl_scale.rollout.publish import weights_checksum

CONFIG = DiTConfig(hidden_size=64, depth=2, num_heads=4, num_frames=4, height=8, width=8,
                   patch_size=(2, 4, 4), text_dim=16, max_text_tokens=6)


def _plain() -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(CONFIG)
    with torch.no_grad():
        for param in model.parameters():  # no zero-initialised layers: every shard matters
            param.normal_(std=0.2)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(3, 3, 4, 8, 8, generator=generator), torch.rand(3, generator=generator),
            torch.randn(3, 6, 16, generator=generator))


def _rank(rank: int, size: int, store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    try:
        plain = _plain()
        model = VideoDiT(CONFIG).eval().requires_grad_(False)  # other initial weights: all must be loaded
        shard_inference_copy(model, dist.device_mesh.init_device_mesh("cpu", (size,)))
        whole = dict(plain.named_parameters())
        for name, param in model.named_parameters():
            load_full(param, whole[name].detach())
        with torch.no_grad():
            velocity = model(*_inputs())
        gathered = {name: tensor.detach().clone() for name, tensor in full_parameters(model)}
        local = local_parameter_count(model)
        torch.save({"velocity": velocity, "gathered": gathered, "local": local,
                    "checksum": weights_checksum(gathered.items())}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_copy_computes_the_plain_velocity(tmp_path: Path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    plain = _plain()
    with torch.no_grad():
        want = plain(*_inputs())
    whole = sum(p.numel() for p in plain.parameters())
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["velocity"], want, rtol=1e-5, atol=1e-5)
        assert result["local"] < whole  # the projections really are split
        for name, param in plain.named_parameters():
            assert torch.equal(result["gathered"][name], param.detach()), name
        assert result["checksum"] == weights_checksum(plain.named_parameters())


def test_indivisible_heads_name_the_key():
    class ThreeRanks:  # the check runs before any collective: the mesh's size is all it reads
        def size(self) -> int:
            return 3

    with pytest.raises(ConfigError, match="rollout.tp_size.*num_heads=4"):
        shard_inference_copy(VideoDiT(CONFIG), ThreeRanks())
