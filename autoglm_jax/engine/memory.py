"""Sizing the KV page pool from the device's free memory, checking it against the compiled step programs,
and the XLA persistent compilation cache.

Owns: the arithmetic "free bytes x memory_fraction - reserves -> pages" (``plan_pool``), what a compiled
program needs beside its donated inputs (``program_need_bytes``) and the re-plan when the largest need does
not fit the room the plan left (``fit_programs``); and, for the runner's pool allocation, telling an
allocator's out-of-memory error (``is_out_of_memory``) and moving the weights to host memory while the pool
is allocated when their load left no contiguous room for it (``park_on_host``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.device_state import DeviceState
from autoglm_jax.model.kv_cache import KVCache

log = logging.getLogger(__name__)
CPU_KV_BUDGET_BYTES = 4 << 30  # no memory stats on CPU: never plan more than this for the pool
PROGRAM_MARGIN_BYTES = 256 << 20  # a re-plan leaves the largest program this much beyond its need


def activation_reserve_bytes(config: ModelConfig, max_num_batched_tokens: int) -> int:
    """Peak transient memory of one step, generously: logits + MLP/QKV activations in float32."""
    per_token = config.vocab_size + 2 * config.intermediate_size + config.qkv_size + 4 * config.hidden_size
    return 4 * max_num_batched_tokens * per_token * 2 + (256 << 20)


def device_memory_stats(device) -> dict | None:
    """The device's memory statistics (``bytes_limit``, ``bytes_in_use``), or None where the backend has
    none (CPU). The one place the plan reads them (tests replace it to plan for a GPU-sized device)."""
    return device.memory_stats() if hasattr(device, "memory_stats") else None


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """A KV pool size and the device memory arithmetic it came from. ``bytes_limit`` is None where the
    device reports no memory (then only ``num_pages`` means anything)."""

    num_pages: int             # including the scratch page 0
    page_bytes: int
    pages_per_sequence: int    # pages of one sequence of max_sequence_length
    bytes_limit: int | None = None
    taken_bytes: int = 0       # in use at planning + weights still to load + sampler slot state
    memory_fraction: float = 1.0
    reserve_bytes: int = 0     # the activation reserve taken off the pool's share
    given: bool = False        # num_pages set by the user: reported on, never re-planned

    @property
    def program_room_bytes(self) -> int | None:
        """What the plan left the step programs: everything not given to the pool, weights, slot state and
        memory in use = (1 - memory_fraction) x bytes_limit + reserve (+ the pages' rounding)."""
        if self.bytes_limit is None:
            return None
        return self.bytes_limit - self.taken_bytes - self.num_pages * self.page_bytes

    def with_reserve(self, reserve_bytes: int) -> PoolPlan:
        """The pages that fit with ``reserve_bytes`` taken off; MemoryError when one sequence does not fit."""
        free = self.bytes_limit * self.memory_fraction - self.taken_bytes - reserve_bytes
        pages = int(free // self.page_bytes)
        if pages < self.pages_per_sequence + 1:
            raise MemoryError(
                f"only {max(pages, 0)} KV pages of {self.page_bytes} bytes fit in {free / 2**30:.2f} GiB of free "
                f"device memory; one sequence of max_sequence_length needs {self.pages_per_sequence}. "
                f"Lower max_sequence_length / max_num_batched_tokens or raise memory_fraction.")
        return dataclasses.replace(self, num_pages=pages, reserve_bytes=reserve_bytes)


def plan_pool(config: ModelConfig, *, page_size: int, cache_dtype, max_batch_size: int, max_sequence_length: int,
              max_num_batched_tokens: int, memory_fraction: float, device=None, pending_bytes: int = 0,
              reserve_bytes: int | None = None, num_pages: int | None = None) -> PoolPlan:
    """The KV pool that fits the device's free memory. ``pending_bytes``: device memory still to be taken
    before the pool (weights not loaded yet, sized from their abstract shapes), counted as in use.
    ``reserve_bytes``: the step programs' reserve (default ``activation_reserve_bytes``). ``num_pages``:
    the user's pool size, kept as given; the plan then only reports the room it leaves the programs."""
    per_page = KVCache.bytes_per_page(config, page_size, cache_dtype)
    pages_per_sequence = -(-max_sequence_length // page_size)
    stats = device_memory_stats(device or jax.devices()[0])
    if not stats or "bytes_limit" not in stats:
        wanted = max_batch_size * pages_per_sequence + 1
        return PoolPlan(num_pages or max(2, min(wanted, CPU_KV_BUDGET_BYTES // per_page)), per_page,
                        pages_per_sequence, given=num_pages is not None)
    if reserve_bytes is None:
        reserve_bytes = activation_reserve_bytes(config, max_num_batched_tokens)
    taken = stats.get("bytes_in_use", 0) + pending_bytes + DeviceState.slot_state_bytes(config, max_batch_size)
    plan = PoolPlan(num_pages or 0, per_page, pages_per_sequence, stats["bytes_limit"], taken, memory_fraction,
                    reserve_bytes, given=num_pages is not None)
    return plan if plan.given else plan.with_reserve(reserve_bytes)


def plan_num_pages(config: ModelConfig, **kwargs) -> int:
    """Number of KV pages (including the scratch page 0) that fit the device's free memory (``plan_pool``)."""
    return plan_pool(config, **kwargs).num_pages


def program_need_bytes(compiled) -> int | None:
    """Device bytes a compiled program takes beyond its arguments while it runs: temporaries + outputs not
    written over a donated input (temp + output - alias). None when the backend cannot say
    (``memory_analysis`` missing, None or failing, e.g. for some executables loaded from a cache)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend / loaded executable implements it
        return None
    if stats is None:
        return None
    return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes


def fit_programs(plan: PoolPlan, needs: dict[str, int]) -> PoolPlan:
    """``plan`` when the largest of the compiled programs' ``needs`` (name -> ``program_need_bytes``) fits
    the room it leaves them; else re-planned with the reserve raised to cover that need plus
    ``PROGRAM_MARGIN_BYTES`` (fewer pages), with a warning. A user-given pool is only warned about.
    Raises ValueError when the re-planned pool cannot hold one sequence."""
    room = plan.program_room_bytes
    if room is None or not needs:
        return plan
    name, need = max(needs.items(), key=lambda item: item[1])
    if need <= room:
        return plan
    gib = 2**30
    if plan.given:
        log.warning("step program %s needs %.2f GiB beside its inputs; num_pages=%d leaves the programs %.2f GiB: "
                    "it may run out of device memory (lower num_pages)", name, need / gib, plan.num_pages, room / gib)
        return plan
    try:
        replanned = plan.with_reserve(plan.reserve_bytes + need - room + PROGRAM_MARGIN_BYTES)
    except MemoryError as e:
        raise ValueError(
            f"the step program {name} needs {need / gib:.2f} GiB of device memory beside its inputs; with it, "
            f"the KV pool cannot hold one sequence ({plan.pages_per_sequence} pages of {plan.page_bytes} bytes). "
            f"Lower max_num_batched_tokens or max_batch_size (the programs' size) or max_sequence_length "
            f"(max_model_len: a sequence's pages); the programs already get all memory beyond the pool, so "
            f"memory_fraction does not help") from e
    log.warning("step program %s needs %.2f GiB beside its inputs but the KV pool plan left the programs %.2f GiB "
                "(activation reserve %.2f GiB): num_pages %d -> %d, compiling the step programs again",
                name, need / gib, room / gib, plan.reserve_bytes / gib, plan.num_pages, replanned.num_pages)
    return replanned


def enable_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache at ``path`` (None leaves it off)."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def is_out_of_memory(error: BaseException) -> bool:
    """True for the runtime's error of an allocation that found no room (XLA's ``RESOURCE_EXHAUSTED``)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def park_on_host(tree) -> Callable[[], Any]:
    """Copies the device arrays of ``tree`` to host memory and frees their device buffers (every reference
    to them is invalid afterwards); returns the function that puts them back (same shardings) and returns
    the tree. For an allocation that needs contiguous device memory the weights' load fragmented: loading
    with quantization frees each bfloat16 weight between the narrow copies, so XLA's allocator has the room
    for the KV pool's K and V arrays in total but not in one piece (GLM-4-9B W8A8 on an H100: 38 GiB free,
    one 24 GiB array did not fit). Allocated on the emptied device, the pool takes one contiguous region
    and the weights come back around it."""
    leaves, treedef = jax.tree.flatten(tree)
    shardings = [x.sharding for x in leaves]
    host = jax.device_get(leaves)
    for x in leaves:
        x.delete()

    def restore():
        return jax.tree.unflatten(treedef, [jax.device_put(h, s) for h, s in zip(host, shardings)])

    return restore
