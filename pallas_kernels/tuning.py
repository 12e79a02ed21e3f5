"""Tuned block sizes as data: lookup in ``pallas_kernels/tuning/<kernel>.json``, never failing.

Owns: reading the per-kernel JSON tables and asking which card the kernels target (the real
default device, or the abstract H100 that ``_interpret.gpu_interpret`` installs). It does not own
how a kernel turns a table entry into its config or what its heuristic fallback is: each kernel
file does that.

Table format (one file per kernel)::

    {"entries": [{"device_kind": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
                  "shape": "<kernel-specific key>", "config": {...}}, ...]}

A missing file, a missing entry or an entry for another card yields ``None``; the caller falls
back to its heuristic.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax

TUNING_DIR = pathlib.Path(__file__).parent / "tuning"


def device_kind() -> str:
    """Device kind of the target card: the abstract mesh's device if one is set, else the default device."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return abstract.device_kind
    return jax.devices()[0].device_kind


def num_sms() -> int:
    """Streaming multiprocessors of the target card (132 on an H100 SXM when the runtime does not say)."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return abstract.num_cores
    return getattr(jax.devices()[0], "core_count", 132) or 132


@functools.cache
def _load_table(kernel: str) -> dict[tuple[str, str, str], dict]:
    path = TUNING_DIR / f"{kernel}.json"
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["entries"]
    return {(e["device_kind"], e["dtype"], e["shape"]): e["config"] for e in entries}


def lookup(kernel: str, dtype, shape_key: str) -> dict | None:
    """The tuned config fields for (current device kind, dtype, shape_key), or None if untuned."""
    import jax.numpy as jnp

    return _load_table(kernel).get((device_kind(), jnp.dtype(dtype).name, shape_key))


def split_k(num_n_tiles: int, num_k_steps: int, step_bytes: int, partial_bytes_per_split: int,
            min_steps_per_split: int = 4, ctas_per_sm: int = 1) -> int:
    """Split-K factor S for a weight-streaming (small-M) matmul of ``num_n_tiles`` output tiles, each
    ``num_k_steps`` steps of ``step_bytes``: the S (each split >= ``min_steps_per_split`` steps; the
    last split may be shorter) with the fewest bytes moved in the slowest SM's time, counting a partly
    filled last wave of CTAs as full (``waves * SMs * ceil(steps / S) * step_bytes``) plus the float32
    partial sums written and read back (``2 * S * partial_bytes_per_split``). More splits fill the
    SMs more evenly; fewer write less. ``ctas_per_sm`` CTAs resident per SM widen a wave."""
    sms = num_sms() * ctas_per_sm

    def cost(splits: int) -> float:
        waves = -(-num_n_tiles * splits // sms)
        return waves * sms * -(-num_k_steps // splits) * step_bytes + 2 * splits * partial_bytes_per_split

    candidates = [s for s in range(1, 33) if s == 1 or -(-num_k_steps // s) >= min_steps_per_split]
    return min(candidates, key=lambda s: (cost(s), s))
