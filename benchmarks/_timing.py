"""Timing helpers shared by the GPU benchmarks: queued-call wall time and the HBM copy ceiling.

Owns: how a benchmark turns calls into milliseconds. Calls are dispatched asynchronously and blocked on
once per batch, so for work longer than JAX's dispatch (~20-70 µs) the median is device time.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


WARMUP_BATCHES = 3  # time_ms's warm-up in a multi-process job (the same count in every process)


def batch_ms(fn, *args, iterations: int) -> float:
    """Wall ms per call of ``iterations`` queued calls of ``fn(*args)``, blocked on once."""
    start = time.perf_counter()
    for _ in range(iterations):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iterations * 1e3


def time_ms(fn, *args, iterations: int = 20, warmup_s: float = 0.2) -> float:
    """Median wall time per call (ms) over 5 batches of ``iterations`` queued calls, after ``warmup_s`` seconds of
    calls: a GPU left idle (e.g. while a sweep compiles its next candidate) clocks down, and short programs timed
    straight after read up to 2x slow (H200, session 20: one small-M config at 11.6 and 19.7 µs in two runs).
    In a job of several processes ``fn`` is a collective every process must call as often as the others, so the
    warm-up is a fixed ``WARMUP_BATCHES`` batches there, not a time.
    (CUPTI via ``mosaic.gpu.profiler.measure`` returned no timings on these machines.)"""
    jax.block_until_ready(fn(*args))
    if jax.process_count() > 1:
        for _ in range(WARMUP_BATCHES):
            batch_ms(fn, *args, iterations=iterations)
    else:
        began = time.perf_counter()
        while time.perf_counter() - began < warmup_s:
            batch_ms(fn, *args, iterations=iterations)
    return statistics.median(batch_ms(fn, *args, iterations=iterations) for _ in range(5))


def copy_bandwidth(num_bytes: int = 1 << 30, warmup_s: float = 1.0, max_s: float = 3.0) -> float:
    """HBM bandwidth in bytes/s of an elementwise bf16 copy of ``num_bytes``, counting read + write: the
    fastest of up to 20 batches of 10 copies (at least 3; at most ``max_s`` seconds of them) after
    ``warmup_s`` seconds of copies. A ceiling is the best the card does: on a GPU that had been idle, the
    median of five batches read up to 10% low (H100, session 11: the same 8.06 ms batch-1 step came out
    at 0.92 and at 0.82 of the roofline in two runs of one call)."""
    x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda v: v * jnp.bfloat16(1.0009765625))
    jax.block_until_ready(copy(x))
    began = time.perf_counter()
    while time.perf_counter() - began < warmup_s:  # clocks up
        jax.block_until_ready(copy(x))
    times, began = [], time.perf_counter()
    while len(times) < 20 and (len(times) < 3 or time.perf_counter() - began < max_s):
        times.append(batch_ms(copy, x, iterations=10))
    return 2 * x.nbytes / (min(times) / 1e3)


def time_chained_ms(fn, a, weights: list[tuple], iterations: int = 10) -> float:
    """Device time per call (ms) of ``fn(a, *w)`` for each ``w`` in ``weights``, all inside one jitted
    program, as a decoder's layers call a projection: per-call dispatch is paid once per program, and
    distinct weight buffers (together larger than L2) are streamed from HBM each call, never from cache."""
    return time_ms(chain(fn), a, weights, iterations=iterations) / len(weights)


def chain(fn):
    """The jitted program of ``time_chained_ms``: ``(a, weights) -> [fn(a, *w) for w in weights]``."""
    return jax.jit(lambda a, ws: [fn(a, *w) for w in ws])


def kernel_time_ms(fn, *args, iterations: int = 20) -> float:
    """Device time per call (ms) from a profiler trace: the summed durations of the kernels ``fn`` launches,
    over ``iterations`` calls (after a warm-up), divided by ``iterations``. Unlike ``time_ms`` it does not
    count launch gaps between calls nor host dispatch, so a short kernel's own time is measured exactly;
    on a backend without device planes (CPU) it falls back to ``time_ms``."""
    from autoglm_jax.tools.device_profile import profile_device

    jax.block_until_ready(fn(*args))

    def run():
        out = None
        for _ in range(iterations):
            out = fn(*args)
        return out

    profile = profile_device(run, warmup=0)
    if not profile.num_devices:
        return time_ms(fn, *args, iterations=iterations)
    return sum(ms for ms, _ in profile.per_op.values()) / iterations
