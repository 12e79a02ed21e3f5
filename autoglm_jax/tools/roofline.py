"""Roofline time and bound of a step on a device: max(FLOPs / peak, bytes / bandwidth).

Owns: the peak-throughput table of the cards we target (dense, no sparsity) and the roofline
arithmetic. Figures are datasheet peaks; a real step reaches a fraction of them. Unknown devices
(CPU, other cards) have no entry: pass a ``DeviceSpec`` explicitly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Peak matmul FLOP/s per compute dtype and memory bandwidth in bytes/s."""

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float

    def __post_init__(self):
        if self.memory_bandwidth <= 0 or any(v <= 0 for v in self.peak_flops.values()):
            raise ValueError(f"{self.name}: peaks must be > 0, got {self.peak_flops} and {self.memory_bandwidth}")

    def flops_for(self, dtype) -> float:
        name = jnp.dtype(dtype).name
        if name not in self.peak_flops:
            raise KeyError(f"{self.name} has no peak for dtype {name!r}; known: {sorted(self.peak_flops)}")
        return self.peak_flops[name]


# Datasheet dense peaks; float32 = plain FP32 (our float32 matmuls ask for HIGHEST precision, not TF32).
_HOPPER = {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}
DEVICE_SPECS: tuple[tuple[str, DeviceSpec], ...] = (  # (device_kind substring, spec); first match wins
    ("H100 PCIe", DeviceSpec("NVIDIA H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}, 2.0e12)),
    ("H100", DeviceSpec("NVIDIA H100 SXM", _HOPPER, 3.35e12)),
    ("H200", DeviceSpec("NVIDIA H200", _HOPPER, 4.8e12)),
)


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The table's spec for a ``jax.Device.device_kind``, or None if the card is not in it."""
    for needle, spec in DEVICE_SPECS:
        if needle in device_kind:
            return spec
    return None


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float
    memory_s: float
    arithmetic_intensity: float  # FLOPs per byte of the step
    ridge_point: float           # FLOPs per byte where the device turns compute-bound

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "time_s": self.time_s, "bound": self.bound}


def roofline(flops: float, num_bytes: float, spec: DeviceSpec, dtype) -> Roofline:
    if flops < 0 or num_bytes <= 0:
        raise ValueError(f"need flops >= 0 and bytes > 0, got {flops=} {num_bytes=}")
    peak = spec.flops_for(dtype)
    return Roofline(compute_s=flops / peak, memory_s=num_bytes / spec.memory_bandwidth,
                    arithmetic_intensity=flops / num_bytes, ridge_point=peak / spec.memory_bandwidth)
