"""Every collective in the package can be checked for the device of its tensors (issue 16, item 2).

On a CPU machine a tensor made without `device=world.device` lands where gloo wants it, so a 2-rank
run cannot show the bug that NCCL would (a CPU tensor under nccl). What CI can check is that every
tensor collective goes through `parallel.distributed.collective(...)` with its tensors (which
`check_devices` verifies against the process group's backend device, tested in
test_zz_gpu_readiness.py with a stand-in device), and every object collective is preceded by
`check_object_device`. This test reads the source, so a new call site that skips them fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                      "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                      "gather", "scatter", "reduce"}
OBJECT_COLLECTIVES = {"all_gather_object", "broadcast_object_list", "gather_object",
                      "scatter_object_list"}
# call sites whose tensors are the model's own activations or parameters, on the model's device by
# construction (autograd functions of context parallel; DeepSpeed's partitions)
ON_MODEL_DEVICE = {("ddrl_scale/parallel/context_parallel.py", "_all_to_all"),
                   ("ddrl_scale/parallel/context_parallel.py", "forward"),
                   ("ddrl_scale/parallel/deepspeed_engine.py", "_gather_partition")}


# object collectives whose callers check (the data layer has no world): Trainer.save before gather_state
CHECKED_BY_CALLER = {("ddrl_scale/data/sharded.py", "gather_state")}


def _sites():
    for path in sorted([*ROOT.joinpath("ddrl_scale").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"
                    and node.func.attr in TENSOR_COLLECTIVES | OBJECT_COLLECTIVES):
                chain, up = [], node
                while up in parents:
                    up = parents[up]
                    chain.append(up)
                yield path.relative_to(ROOT).as_posix(), node, chain


def _function(chain):
    return next((n for n in chain if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)


def test_every_tensor_collective_declares_its_tensors():
    unchecked = []
    for path, node, chain in _sites():
        if node.func.attr not in TENSOR_COLLECTIVES:
            continue
        function = _function(chain)
        if (path, getattr(function, "name", "")) in ON_MODEL_DEVICE:
            continue
        wrapper = next((n for n in chain if isinstance(n, ast.Call)
                        and getattr(n.func, "id", "") == "collective"), None)
        declared = wrapper is not None and (len(wrapper.args) >= 3
                                            or any(k.arg == "tensors" for k in wrapper.keywords))
        if not declared:
            unchecked.append(f"{path}:{node.lineno} dist.{node.func.attr}")
    assert not unchecked, ("collectives whose tensors collective() cannot check (pass them as its "
                           f"third argument): {unchecked}")


def test_every_object_collective_checks_the_cuda_device_first():
    unchecked = []
    for path, node, chain in _sites():
        if node.func.attr not in OBJECT_COLLECTIVES:
            continue
        function = _function(chain)
        if (path, getattr(function, "name", "")) in CHECKED_BY_CALLER:
            continue
        calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)] if function else []
        if not any(getattr(call.func, "id", getattr(call.func, "attr", "")) == "check_object_device"
                   and call.lineno <= node.lineno for call in calls):
            unchecked.append(f"{path}:{node.lineno} dist.{node.func.attr}")
    assert not unchecked, f"object collectives without check_object_device before them: {unchecked}"
