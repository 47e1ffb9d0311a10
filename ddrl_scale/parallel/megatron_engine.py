"""The "megatron" engine: megatron-core tensor parallel for the DiT's projections, with data parallel.

Applied from outside the plain VideoDiT: in every block the attention query / key / value and the
first MLP layer become `ColumnParallelLinear` (output features split over the TP ranks, so each rank
holds num_heads / tp heads), the attention output and the second MLP layer `RowParallelLinear`
(input features split, outputs summed over TP); norms, embeddings and adaLN stay replicated (the
per-head QK norms, shared by heads that live on different ranks, get their gradients summed over
TP). Gradients are averaged over the data-parallel group; the grad norm counts TP-split tensors once per
shard and replicated ones once. Parameter names stay those of the plain model.

Checkpoints: each TP rank's shards (model, optimizer, EMA) in `megatron/tp{R}.pt`, written by the
first data-parallel rank, with the split dimension of every tensor, so `read_weights` can join
them; a run resumes with the same TP size (any DP size).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddrl_scale.config.schema import ConfigError, OptimSection, ParallelSection
from ddrl_scale.parallel import megatron_compat
from ddrl_scale.parallel.distributed import World, collective
from ddrl_scale.parallel.engine import TorchEngine, register_engine

logger = logging.getLogger(__name__)

REPLICATED = -1  # split dimension of a tensor every TP rank holds whole


@functools.cache
def _layer_classes() -> tuple[type, type]:
    """Megatron's TP linears returning only the output (they return (output, bias)), as the DiT wants."""
    from megatron.core import tensor_parallel

    class Column(tensor_parallel.ColumnParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class Row(tensor_parallel.RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return Column, Row


def _parallel_linear(kind: str, plain: nn.Linear, config, tp_rank: int, tp_size: int) -> nn.Module:
    """A Megatron column- or row-parallel layer holding this rank's shard of `plain`'s weights, on
    `plain`'s device (Megatron allocates on the CPU or the current CUDA device: see
    megatron_config)."""
    Column, Row = _layer_classes()
    common = dict(config=config, init_method=lambda weight: None, bias=plain.bias is not None,
                  skip_bias_add=False)
    if kind == "column":
        layer = Column(plain.in_features, plain.out_features, gather_output=False, **common)
        weight = plain.weight.chunk(tp_size, dim=0)[tp_rank]
        bias = plain.bias.chunk(tp_size, dim=0)[tp_rank] if plain.bias is not None else None
    else:
        layer = Row(plain.in_features, plain.out_features, input_is_parallel=True, **common)
        weight, bias = plain.weight.chunk(tp_size, dim=1)[tp_rank], plain.bias
    # the model was moved to the engine's device before wrapping: the shard goes where it is
    layer.to(device=plain.weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.split_dims = {"weight": 0 if kind == "column" else 1,
                        "bias": 0 if kind == "column" else REPLICATED}
    return layer


def megatron_config(tp_size: int, device: torch.device, dtype: torch.dtype):
    """The ModelParallelConfig of the TP layers for a model on `device`.

    Megatron allocates a layer's weights on the CPU with `use_cpu_initialization`, else on
    `torch.cuda.current_device()`; it must be the model's device, or a GPU run keeps its TP layers on
    the CPU (issue 16). Weights are copied in from the plain layers, so Megatron initialises nothing."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size, use_cpu_initialization=device.type != "cuda",
        gradient_accumulation_fusion=False, perform_initialization=False, params_dtype=dtype)


def apply_tensor_parallel(model: nn.Module, tp_size: int) -> dict[str, int]:
    """Swap the DiT's projections for Megatron TP layers (on the model's device); returns each
    parameter's split dim."""
    from megatron.core import parallel_state

    config = model.config
    if config.num_heads % tp_size or config.mlp_hidden % tp_size:
        raise ConfigError(f"parallel.tp={tp_size} must divide model.num_heads={config.num_heads} and "
                          f"the MLP width {config.mlp_hidden}")
    first = next(model.parameters())
    layer_config = megatron_config(tp_size, first.device, first.dtype)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for block in model.blocks:
        for attention in (block.self_attn, block.cross_attn):
            for name in ("query", "key", "value"):
                setattr(attention, name, _parallel_linear("column", getattr(attention, name),
                                                          layer_config, tp_rank, tp_size))
            attention.out = _parallel_linear("row", attention.out, layer_config, tp_rank, tp_size)
            attention.num_heads = config.num_heads // tp_size
            # the per-head QK norms are shared by all heads, but each rank sees only its own heads:
            # their gradients are partial sums, completed by an all-reduce over TP in step()
            for norm in (attention.query_norm, attention.key_norm):
                for param in norm.parameters():
                    param.partial_over_tp = True
        block.mlp[0] = _parallel_linear("column", block.mlp[0], layer_config, tp_rank, tp_size)
        block.mlp[2] = _parallel_linear("row", block.mlp[2], layer_config, tp_rank, tp_size)
    split = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            split[full] = getattr(module, "split_dims", {}).get(param_name, REPLICATED)
    return split


@register_engine("megatron")
class MegatronEngine(TorchEngine):
    def __init__(self, model: nn.Module, optim: OptimSection, parallel: ParallelSection, world: World,
                 dtype: str = "fp32", accumulation_steps: int = 1):
        if not dist.is_initialized():
            raise ConfigError("parallel.engine=megatron needs torch.distributed: start the run with "
                              "torchrun (also for one process: torchrun --nproc_per_node=1)")
        from megatron.core import parallel_state, tensor_parallel

        self.compat = megatron_compat.enable()  # on a CPU-only torch; nothing on GPUs
        if world.world_size % parallel.tp:
            raise ConfigError(f"parallel.tp={parallel.tp} does not divide the world size "
                              f"{world.world_size}")
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)  # Megatron's RNG tracker
        self.tp_size, self.tp_group = parallel.tp, parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        super().__init__(model, optim, parallel, world, dtype, accumulation_steps)

    def wrap(self, model: nn.Module, parallel: ParallelSection) -> nn.Module:
        self.split_dims = apply_tensor_parallel(model, parallel.tp)
        logger.info("megatron: tensor parallel %d x data parallel %d", self.tp_size, self.dp_size)
        return model

    def step(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if self.dp_size > 1:
            for param in parameters:
                collective("all_reduce(grad, dp)",
                           lambda p=param: dist.all_reduce(p.grad, group=self.dp_group), [param.grad],
                           self.dp_group)
                param.grad.div_(self.dp_size)
        for param in parameters:
            if getattr(param, "partial_over_tp", False) and self.tp_size > 1:
                collective("all_reduce(partial grad, tp)",
                           lambda p=param: dist.all_reduce(p.grad, group=self.tp_group), [param.grad],
                           self.tp_group)
        self.force_finite(parameters)  # after the reductions: every replica zeroes the same
        names = {id(p): name for name, p in self.model.named_parameters()}
        split_sq = sum((p.grad.float() ** 2).sum() for p in parameters
                       if self.split_dims[names[id(p)]] != REPLICATED)
        replicated_sq = sum((p.grad.float() ** 2).sum() for p in parameters
                            if self.split_dims[names[id(p)]] == REPLICATED)
        # on the engine's device even when no gradient is TP-split (the sum is then the int 0)
        split_sq = torch.as_tensor(split_sq, dtype=torch.float32, device=self.device)
        collective("all_reduce(grad norm, tp)", lambda: dist.all_reduce(split_sq, group=self.tp_group),
                   [split_sq], self.tp_group)
        grad_norm = float(torch.sqrt(split_sq + replicated_sq))
        if self.grad_clip > 0 and grad_norm > self.grad_clip:
            for param in parameters:
                param.grad.mul_(self.grad_clip / (grad_norm + 1e-6))
        self.optimizer.step()
        self.finish_step()
        return grad_norm

    def save(self, directory: Path) -> None:
        if self.dp_rank == 0:
            target = directory / "megatron"
            target.mkdir(parents=True, exist_ok=True)
            torch.save({"tp_size": self.tp_size, "split_dims": self.split_dims,
                        "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "ema": self.ema.state_dict() if self.ema is not None else None},
                       target / f"tp{self.tp_rank}.pt")
        self.save_schedule(directory)

    def load(self, directory: Path) -> None:
        path = directory / "megatron" / f"tp{self.tp_rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint '{directory}' has no Megatron shard "
                                    f"megatron/tp{self.tp_rank}.pt; was it written by another engine?")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["tp_size"] != self.tp_size:
            raise ConfigError(f"checkpoint '{directory}' was written with parallel.tp="
                              f"{state['tp_size']}; resume with the same parallel.tp")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.load_schedule(directory)

    def gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dim = self.split_dims[name]
        if dim == REPLICATED:
            return tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.tp_size)]
        collective(f"all_gather({name}, tp)",
                   lambda: dist.all_gather(pieces, tensor.contiguous(), group=self.tp_group),
                   [tensor, *pieces], self.tp_group)
        return torch.cat(pieces, dim=dim)


def read_megatron_weights(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Join the TP shards of a Megatron checkpoint into full tensors (one process)."""
    files = sorted((path / "megatron").glob("tp*.pt"), key=lambda f: int(f.stem[2:]))
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    if not shards or len(shards) != shards[0]["tp_size"]:
        raise FileNotFoundError(f"checkpoint '{path}': {len(shards)} Megatron shards found")
    key = "ema" if ema else "model"
    if shards[0][key] is None:
        raise KeyError(f"checkpoint '{path}' holds no EMA weights")
    out = {}
    for name, dim in shards[0]["split_dims"].items():  # parameters only (not Megatron's extra state)
        tensor = shards[0][key][name]
        out[name] = tensor if dim == REPLICATED else torch.cat([s[key][name] for s in shards], dim=dim)
    return out
