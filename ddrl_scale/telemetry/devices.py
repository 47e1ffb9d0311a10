"""Data-sheet figures of the accelerators the framework plans for: peak FLOP/s, memory, links.

Used by `telemetry.throughput` (the MFU denominator) and `telemetry.plan` (memory limits and
communication bandwidth). Peaks are dense (no 2:4 sparsity): NVIDIA data sheets print the sparse
tensor-core figure, twice the dense one, so the tensor figures below are the printed ones halved.

Sources (NVIDIA product data sheets and the architecture briefs they cite):
- H100 SXM5 / PCIe: "NVIDIA H100 Tensor Core GPU" data sheet: FP32 67 / 51 TFLOPS, TF32 989 / 756*,
  BF16 1,979 / 1,513* TFLOPS (* with sparsity), 80 GB, NVLink 900 GB/s (SXM), PCIe Gen5 128 GB/s.
- H200 SXM: "NVIDIA H200 Tensor Core GPU" data sheet: the H100 SXM's compute, 141 GB HBM3e,
  NVLink 900 GB/s.
- A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" data sheet: FP32 19.5, TF32 156, BF16 312 TFLOPS
  (dense), NVLink 600 GB/s.
- L40S: "NVIDIA L40S" data sheet: FP32 91.6, TF32 183, BF16 362.05 TFLOPS (dense), 48 GB,
  PCIe Gen4 x16 64 GB/s bidirectional, no NVLink.
- B200 (HGX B200, 1,000 W): "NVIDIA Blackwell Architecture Technical Brief": FP32 80,
  TF32 2.2*, BF16 4.5* PFLOPS (* with sparsity), NVLink 5 1.8 TB/s; 180 GB per GPU usable in
  HGX/DGX B200 (1,440 GB per 8-GPU system).
Link figures are per GPU and per direction (the data sheets' NVLink numbers are both directions
together). The inter-node figure assumes one NIC per GPU: 400 Gb/s NDR InfiniBand (ConnectX-7) for
H100 / H200 / B200 systems, 200 Gb/s HDR for A100 and L40S systems; `ddrl plan` can override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TERA = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: dense peak FLOP/s by math mode, memory, per-direction link bandwidths."""

    name: str
    memory_gb: float  # decimal GB of device memory
    peak_flops: dict[str, float] = field(default_factory=dict)  # "bf16" | "tf32" | "fp32" -> FLOP/s
    intra_node_gb_s: float = 0.0  # per GPU, per direction, inside a node (NVLink or PCIe)
    inter_node_gb_s: float = 0.0  # per GPU, per direction, between nodes (the NIC)
    intra_node_link: str = ""
    inter_node_link: str = ""


_H100_COMPUTE = {"bf16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}

DEVICES: dict[str, DeviceSpec] = {
    "h100-sxm": DeviceSpec("h100-sxm", 80.0, _H100_COMPUTE, 450.0, 50.0,
                           "NVLink 4 (900 GB/s both ways)", "400 Gb/s NDR InfiniBand per GPU"),
    "h100-pcie": DeviceSpec("h100-pcie", 80.0,
                            {"bf16": 756.5 * TERA, "tf32": 378.0 * TERA, "fp32": 51.0 * TERA},
                            64.0, 50.0, "PCIe Gen5 x16 (128 GB/s both ways)",
                            "400 Gb/s NDR InfiniBand per GPU"),
    "h200": DeviceSpec("h200", 141.0, _H100_COMPUTE, 450.0, 50.0,
                       "NVLink 4 (900 GB/s both ways)", "400 Gb/s NDR InfiniBand per GPU"),
    "a100": DeviceSpec("a100", 80.0, {"bf16": 312.0 * TERA, "tf32": 156.0 * TERA,
                                      "fp32": 19.5 * TERA},
                       300.0, 25.0, "NVLink 3 (600 GB/s both ways)", "200 Gb/s HDR InfiniBand per GPU"),
    "l40s": DeviceSpec("l40s", 48.0, {"bf16": 362.05 * TERA, "tf32": 183.0 * TERA,
                                      "fp32": 91.6 * TERA},
                       32.0, 25.0, "PCIe Gen4 x16 (64 GB/s both ways)", "200 Gb/s per GPU (assumed)"),
    "b200": DeviceSpec("b200", 180.0, {"bf16": 2250.0 * TERA, "tf32": 1100.0 * TERA,
                                       "fp32": 80.0 * TERA},
                       900.0, 50.0, "NVLink 5 (1.8 TB/s both ways)", "400 Gb/s NDR InfiniBand per GPU"),
}
ALIASES = {"h100": "h100-sxm", "h100sxm": "h100-sxm", "h200-sxm": "h200", "a100-sxm": "a100",
           "a100-80gb": "a100", "b200-sxm": "b200"}


def device_spec(name: str) -> DeviceSpec:
    """The table entry for a `--gpu` name (case-insensitive; h100 means the SXM part)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise ValueError(f"unknown GPU type '{name}'; known: {', '.join(sorted(DEVICES))} "
                         f"(aliases: {', '.join(sorted(ALIASES))})")
    return DEVICES[key]


def spec_for_device_name(device_name: str) -> DeviceSpec | None:
    """Match a CUDA device name (torch.cuda.get_device_name) to the table; None when unknown.

    SXM H100s report as "NVIDIA H100 80GB HBM3", PCIe ones contain "PCIe"; H100 NVL and other
    variants without an entry return None (the caller then measures).
    """
    name = device_name.lower()
    if "b200" in name:
        return DEVICES["b200"]
    if "h200" in name and "nvl" not in name:
        return DEVICES["h200"]
    if "h100" in name and "nvl" not in name:
        return DEVICES["h100-pcie" if "pcie" in name else "h100-sxm"]
    if "a100" in name:
        return DEVICES["a100"]
    if "l40s" in name:
        return DEVICES["l40s"]
    return None
