"""One-shot all-reduce over NVLink peer memory for the small messages of tensor-parallel decode (Mosaic GPU).

Owns: ``one_shot_all_reduce(x [..., H], axis_name) -> [..., H]`` (the sum over the mesh axis, called
inside ``shard_map``), its kernel, a float32 reference and the tuning config. It does not own the
choice of when to use it (``autoglm_jax.parallel.collectives``).

Why: a decode step of GLM-4-9B under TP=2 runs 81 all-reduces of [batch, 4096] bf16 (8 KB at batch
1). NCCL's ring/tree all-reduce of such a message is latency-bound (~60 µs each inside the step on
H200, measured in benchmarks/RESULTS.md), which ate TP's gain. A one-shot all-reduce (vLLM's "custom
all-reduce") moves each shard's whole message to every peer in one hop and sums locally:

  every CTA b of device d, for each of its chunks c (c = b, b + num_blocks, ...):
    for each peer p != d: store x_d[c] into recv_p[d, c]  (an NVLink store into p's buffer)
    signal p's semaphore[b]                               (release: the stores are visible first)
  wait until semaphore[b] counted num_devices - 1 signals (decrementing it back to 0)
  y[c] = sum_p recv_d[p, c]   (recv_d[d] = x_d, stored locally; float32, in device order)

The sum is formed in the same device order on every device, so all shards get bit-identical results
(TP shards must agree, or their sampled tokens could differ). ``recv`` is a kernel output, so XLA
places it in symmetric memory and hands the kernel its peers' addresses (single process, several
GPUs: XLA's collective metadata; no NVLink multicast is used). Mosaic's cross-device barrier before
the launch (not skipped) guarantees no peer writes into ``recv`` before this device's kernel runs.

Messages above ``config.max_bytes`` go to ``lax.psum`` (NCCL is bandwidth-optimal there).
The GPU interpreter of jax 0.11.2 cannot run semaphores, so CPU tests lower the kernel for CUDA and
check the wrapper; the sums themselves are checked on the GPU (tests/test_gpu_backends.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LANES = 128  # threads of the warpgroup that runs each CTA's loads and stores
_VECTOR_BYTES = 16  # one 128-bit load/store per thread per step


@dataclasses.dataclass(frozen=True)
class AllReduceConfig:
    """num_blocks: CTAs (each owns every num_blocks-th chunk and one semaphore); chunk_bytes: bytes of
    a CTA step (a multiple of 128 threads x 16 bytes); max_bytes: larger messages use lax.psum."""

    num_blocks: int = 8
    chunk_bytes: int = 4096
    max_bytes: int = 1 << 20

    def __post_init__(self):
        if self.num_blocks < 1:
            raise ValueError(f"{self.num_blocks=} must be >= 1")
        if self.chunk_bytes % (_LANES * _VECTOR_BYTES) or self.chunk_bytes <= 0:
            raise ValueError(f"{self.chunk_bytes=} must be a positive multiple of {_LANES * _VECTOR_BYTES}")
        if self.max_bytes < 0:
            raise ValueError(f"{self.max_bytes=} must be >= 0")


def default_config(num_bytes: int) -> AllReduceConfig:
    """Enough CTAs that each moves a few chunks, at most 32 (latency-bound sizes need few)."""
    chunks = max(num_bytes // AllReduceConfig.chunk_bytes, 1)
    return AllReduceConfig(num_blocks=int(min(max(chunks // 2, 1), 32)))


def supports(x: jax.Array, config: AllReduceConfig | None = None) -> str | None:
    """None if the kernel takes x, else why not (the caller then uses lax.psum)."""
    config = config or default_config(x.size * x.dtype.itemsize)
    if x.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"dtype {x.dtype} (bf16, f16, f32 only)"
    num_bytes = x.size * x.dtype.itemsize
    if num_bytes > config.max_bytes:
        return f"{num_bytes} bytes > max_bytes {config.max_bytes} (NCCL is faster there)"
    if num_bytes % config.chunk_bytes:
        return f"{num_bytes} bytes is not a multiple of chunk_bytes {config.chunk_bytes}"
    return None


def _kernel(x_ref, out_ref, recv_ref, *, axis_name: str, num_devices: int, num_chunks: int, num_blocks: int):
    """x_ref [C, E]: this device's chunks; out_ref [C, E]: the sum; recv_ref [D, C, E]: peers' chunks."""
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR((num_blocks,)))
    block = lax.axis_index("blocks")
    me = lax.axis_index(axis_name)
    layout = plgpu.Layout.WG_STRIDED((x_ref.shape[1],), vec_size=_VECTOR_BYTES // x_ref.dtype.itemsize)

    def load(ref):
        return plgpu.layout_cast(ref[...], layout)

    @pl.loop(block, num_chunks, step=num_blocks)
    def _send(c):
        data = load(x_ref.at[c])
        recv_ref.at[me, c][...] = data  # own slot too, so the sum below reads every term the same way
        for offset in range(1, num_devices):
            peer = lax.rem(me + offset, num_devices)
            plgpu.remote_ref(recv_ref, peer).at[me, c][...] = data

    for offset in range(1, num_devices):
        pl.semaphore_signal(sem.at[block], device_id=lax.rem(me + offset, num_devices))
    pl.semaphore_wait(sem.at[block], num_devices - 1)

    @pl.loop(block, num_chunks, step=num_blocks)
    def _sum(c):
        acc = load(recv_ref.at[0, c]).astype(jnp.float32)
        for d in range(1, num_devices):  # device order: every device forms the bit-identical sum
            acc = acc + load(recv_ref.at[d, c]).astype(jnp.float32)
        out_ref.at[c][...] = acc.astype(out_ref.dtype)


def one_shot_all_reduce(x: jax.Array, axis_name: str, *, config: AllReduceConfig | None = None) -> jax.Array:
    """Sum of x over the mesh axis ``axis_name`` (inside shard_map); lax.psum where the kernel does not apply."""
    num_bytes = x.size * x.dtype.itemsize
    config = config or default_config(num_bytes)
    num_devices = lax.axis_size(axis_name)
    if num_devices == 1:
        return x
    if supports(x, config) is not None:
        return lax.psum(x, axis_name)
    elements = config.chunk_bytes // x.dtype.itemsize
    num_chunks = num_bytes // config.chunk_bytes
    num_blocks = min(config.num_blocks, num_chunks)
    chunks = x.reshape(num_chunks, elements)
    kernel = plgpu.kernel(
        functools.partial(_kernel, axis_name=axis_name, num_devices=num_devices, num_chunks=num_chunks,
                          num_blocks=num_blocks),
        out_type=(jax.ShapeDtypeStruct(chunks.shape, x.dtype),
                  jax.ShapeDtypeStruct((num_devices, *chunks.shape), x.dtype)),
        grid=(num_blocks,),
        grid_names=("blocks",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    out, _ = kernel(chunks)
    return out.reshape(x.shape)


def all_reduce_reference(shards: jax.Array) -> jax.Array:
    """shards [D, ..., H] (each device's partial) -> their float32 sum [..., H]."""
    return jnp.sum(shards.astype(jnp.float32), axis=0)


__all__ = ["AllReduceConfig", "all_reduce_reference", "default_config", "one_shot_all_reduce", "supports"]
