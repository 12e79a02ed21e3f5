"""Tuned block sizes as data: lookup in ``pallas_kernels/tuning/<kernel>.json``, never failing.

Owns: reading the per-kernel JSON tables and asking which card the kernels target (the real
default device, or the abstract H100 that ``_interpret.gpu_interpret`` installs). It does not own
how a kernel turns a table entry into its config or what its heuristic fallback is: each kernel
file does that.

Table format (one file per kernel)::

    {"entries": [{"device_kind": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
                  "shape": "<kernel-specific key>", "config": {...},
                  "kernel_us": 41.2, "xla_us": 44.9}, ...]}

``kernel_us`` / ``xla_us`` (optional): the config's time and XLA's at the same shape, measured in the same
run by ``benchmarks/tune_matmul.py``; ``beats_xla`` reads them (the "auto" matmul backend runs a bf16 kernel
only where its entry says it is faster). A missing file, a missing entry or an entry for another card
yields ``None`` (``beats_xla``: False); the caller falls back to its heuristic.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp

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
    return {(e["device_kind"], e["dtype"], e["shape"]): e for e in entries}


def _entry(kernel: str, dtype, shape_key: str) -> dict | None:
    return _load_table(kernel).get((device_kind(), jnp.dtype(dtype).name, shape_key))


def lookup(kernel: str, dtype, shape_key: str) -> dict | None:
    """The tuned config fields for (current device kind, dtype, shape_key), or None if untuned."""
    entry = _entry(kernel, dtype, shape_key)
    return None if entry is None else entry["config"]


# How much faster than XLA an entry must have been measured for ``beats_xla``: run-to-run noise of the sweeps'
# chained timings is a few percent (H200, XLA's o_proj GEMV at M = 16: 21.1 then 15.2 us in two calls).
BEATS_XLA_MARGIN = 1.03


def beats_xla(kernel: str, dtype, shape_key: str) -> bool:
    """Whether the current card's entry for (dtype, shape_key) was measured faster than XLA at that shape
    (by ``BEATS_XLA_MARGIN`` at least)."""
    entry = _entry(kernel, dtype, shape_key)
    return entry is not None and "kernel_us" in entry and entry["xla_us"] >= BEATS_XLA_MARGIN * entry["kernel_us"]


def shape_keys_beating_xla(kernel: str, dtype) -> list[str]:
    """The shape keys of ``dtype`` whose entries for the current card were measured faster than XLA."""
    kind, name = device_kind(), jnp.dtype(dtype).name
    return sorted(shape for (k, d, shape) in _load_table(kernel) if k == kind and d == name
                  and beats_xla(kernel, dtype, shape))


# Share of the SMs whose CTAs, each streaming weights (small-M matmul), together reach the HBM bandwidth: the
# split-K factors the sweeps chose on an H100 and an H200 (tune_matmul.py; GLM-4 qkv 36 tiles x 3 splits, o_proj
# and down 32 x 4, gate_up 214 x 1) put ~100-130 CTAs on 132 SMs, and no more.
STREAM_FILL = 0.75


def split_k(num_n_tiles: int, num_k_steps: int, step_bytes: int, partial_bytes_per_split: int,
            min_steps_per_split: int = 4, memory_bound: bool = False) -> int:
    """Split-K factor S for a matmul of ``num_n_tiles`` output tiles, each ``num_k_steps`` steps of
    ``step_bytes``: the S (each split >= ``min_steps_per_split`` steps; the last split may be shorter) with
    the lowest cost, the float32 partial sums written and read back (``2 * S * partial_bytes_per_split``)
    included. More splits fill the SMs; fewer write less.
    Compute-bound (the large-M kernel, steps costed in bytes at the flop/byte balance): a partly filled
    last wave of CTAs counts as full (``waves * SMs * ceil(steps / S) * step_bytes``).
    ``memory_bound`` (the small-M kernel streaming weights): the CTAs share the HBM bandwidth, which they
    reach once ``STREAM_FILL * SMs`` of them stream at once, fewer reaching that fraction of it; uneven
    splits move no extra bytes (``tiles * steps * step_bytes / min(1, tiles * S / (STREAM_FILL * SMs))``)."""
    sms = num_sms()

    def cost(splits: int) -> float:
        partial = 2 * splits * partial_bytes_per_split
        if memory_bound:
            ctas = num_n_tiles * splits
            return num_n_tiles * num_k_steps * step_bytes / min(1.0, ctas / (STREAM_FILL * sms)) + partial
        waves = -(-num_n_tiles * splits // sms)
        return waves * sms * -(-num_k_steps // splits) * step_bytes + partial

    candidates = [s for s in range(1, 33) if s == 1 or -(-num_k_steps // s) >= min_steps_per_split]
    return min(candidates, key=lambda s: (cost(s), s))
