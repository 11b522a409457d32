"""The accelerators Conveyor knows by name: their datasheet figures (what the roofline cost model
computes from, and what HELR places layers by), and device lists as a config names them.

Figures from the vendors' datasheets, dense (no sparsity):
- h100 (H100 SXM5 80GB): 989 TFLOP/s BF16/FP16 tensor core, 67 TFLOP/s FP32, 3.35 TB/s HBM3,
  NVLink 4 900 GB/s total = 450 GB/s each way (NVIDIA H100 Tensor Core GPU datasheet).
- h100-pcie (H100 PCIe 80GB): 756 TFLOP/s BF16, 51 TFLOP/s FP32, 2.0 TB/s HBM2e; PCIe Gen5 x16
  64 GB/s each way (NVLink bridges not assumed).
- h200 (H200 SXM 141GB): 989 TFLOP/s BF16, 67 TFLOP/s FP32, 4.8 TB/s HBM3e, NVLink 900 GB/s
  total (NVIDIA H200 datasheet).
- a100 (A100 SXM4 80GB): 312 TFLOP/s BF16, 19.5 TFLOP/s FP32, 2.039 TB/s HBM2e, NVLink 3
  600 GB/s total = 300 GB/s each way (NVIDIA A100 datasheet).
FP32 uses the non-tensor-core peak: PyTorch does not use TF32 for matmuls by default. The link
latency (10 us over NVLink, 20 us over PCIe) is the usual small-message NCCL p2p figure, an
estimate rather than a datasheet number. Memory is the marketed size read as GiB (80 GB parts
report 79.6-80 GiB).

Torch-free, so that a config can be validated without loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_flops_16bit: float
    """Dense BF16/FP16 tensor-core FLOP/s."""
    peak_flops_fp32: float
    """Dense FP32 FLOP/s without TF32."""
    memory_bandwidth: float
    """Bytes/s of device memory."""
    link_bandwidth: float
    """Bytes/s one way to the next stage's device."""
    link_latency_s: float
    memory_gib: float = 80.0
    """Device memory."""

    def peak_flops(self, dtype_bytes: int) -> float:
        return self.peak_flops_fp32 if dtype_bytes >= 4 else self.peak_flops_16bit


DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        DeviceSpec("h100", 989e12, 67e12, 3.35e12, 450e9, 10e-6, 80.0),
        DeviceSpec("h100-pcie", 756e12, 51e12, 2.0e12, 64e9, 20e-6, 80.0),
        DeviceSpec("h200", 989e12, 67e12, 4.8e12, 450e9, 10e-6, 141.0),
        DeviceSpec("a100", 312e12, 19.5e12, 2.039e12, 300e9, 10e-6, 80.0),
    )
}


def device_for_gpu(name: str) -> DeviceSpec | None:
    """The DEVICES entry of a CUDA device name (torch.cuda.get_device_name), e.g.
    "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H100 PCIe" -> h100-pcie; None when unknown."""
    upper = name.upper()
    for key in ("H200", "H100", "A100"):
        if key in upper:
            pcie = "PCIE" in upper and f"{key.lower()}-pcie" in DEVICES
            return DEVICES[f"{key.lower()}-pcie" if pcie else key.lower()]
    return None


@dataclass(frozen=True)
class NamedDevice:
    """One entry of a device list: a known device, with its memory (the datasheet's unless the
    entry says `name:GIB`, e.g. "a100:40" for the 40 GB part)."""

    entry: str
    """As written in the list."""
    spec: DeviceSpec
    memory_gib: float

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


def parse_device(entry: str) -> NamedDevice:
    """`name` or `name:GIB`; ValueError naming the entry and the known devices."""
    name, sep, gib = entry.strip().partition(":")
    spec = DEVICES.get(name.lower())
    if spec is None:
        raise ValueError(f"unknown device {entry!r} (known: {', '.join(DEVICES)}; "
                         f"name:GIB sets its memory)")
    memory = spec.memory_gib
    if sep:
        try:
            memory = float(gib)
        except ValueError:
            memory = -1.0
        if not memory > 0 or memory == float("inf"):
            raise ValueError(f"device {entry!r}: the memory after ':' must be a number of GiB "
                             f"> 0")
    return NamedDevice(entry.strip(), spec, memory)


def parse_devices(entries: Sequence[str]) -> list[NamedDevice]:
    return [parse_device(e) for e in entries]
