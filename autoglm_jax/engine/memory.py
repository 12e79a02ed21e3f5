"""Sizing the KV page pool from the device's free memory, and the XLA persistent compilation cache.

Owns: the arithmetic "free bytes x memory_fraction - reserves -> pages"; nothing is allocated here.
"""

from __future__ import annotations

import logging
import os

import jax

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.device_state import DeviceState
from autoglm_jax.model.kv_cache import KVCache

log = logging.getLogger(__name__)
CPU_KV_BUDGET_BYTES = 4 << 30  # no memory stats on CPU: never plan more than this for the pool


def activation_reserve_bytes(config: ModelConfig, max_num_batched_tokens: int) -> int:
    """Peak transient memory of one step, generously: logits + MLP/QKV activations in float32."""
    per_token = config.vocab_size + 2 * config.intermediate_size + config.qkv_size + 4 * config.hidden_size
    return 4 * max_num_batched_tokens * per_token * 2 + (256 << 20)


def plan_num_pages(config: ModelConfig, *, page_size: int, cache_dtype, max_batch_size: int,
                   max_sequence_length: int, max_num_batched_tokens: int, memory_fraction: float,
                   device=None, pending_bytes: int = 0) -> int:
    """Number of KV pages (including the scratch page 0) that fit the device's free memory.
    ``pending_bytes``: device memory still to be taken before the pool (weights not loaded yet, sized
    from their abstract shapes), counted as in use."""
    per_page = KVCache.bytes_per_page(config, page_size, cache_dtype)
    pages_per_sequence = -(-max_sequence_length // page_size)
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        wanted = max_batch_size * pages_per_sequence + 1
        return max(2, min(wanted, CPU_KV_BUDGET_BYTES // per_page))
    free = stats["bytes_limit"] * memory_fraction - stats.get("bytes_in_use", 0) - pending_bytes
    free -= DeviceState.slot_state_bytes(config, max_batch_size) + activation_reserve_bytes(config, max_num_batched_tokens)
    pages = int(free // per_page)
    if pages < pages_per_sequence + 1:
        raise MemoryError(
            f"only {max(pages, 0)} KV pages of {per_page} bytes fit in {free / 2**30:.2f} GiB of free device "
            f"memory; one sequence of max_sequence_length={max_sequence_length} needs {pages_per_sequence}. "
            f"Lower max_sequence_length / max_num_batched_tokens or raise memory_fraction."
        )
    return pages


def enable_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache at ``path`` (None leaves it off)."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
