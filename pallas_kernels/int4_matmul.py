"""Weight-only int4 matmul with group scales for Hopper (Mosaic GPU), for decode (small M).

Owns: ``int4_matmul(a [M, K] bf16, codes [G, N, g] int4, scales [G, N] f32, offsets [G, N] f32 | None)
-> [M, N]``, a float32 reference, the tuning config and ``supports``. It does not own quantizing
weights (``autoglm_jax.quant.int4``) nor the kernel body (``matmul``'s small-M kernel, which takes
group-scaled weights) nor the model's layout conversion (``autoglm_jax.model.matmul_backend``).

The weight is affine per group of g consecutive K (g = 64 or 128):
    w[k, n] = scales[k // g, n] * codes[k // g, n, k % g] + offsets[k // g, n],   codes in [-8, 7]
An asymmetric 4-bit code c with zero point z and scale s is q = c - 8 with offset s * (8 - z). The
codes are stored group-major ([G, N, g], 4 bits each, read from HBM in that narrow type): one TMA
block of a step is tile_k / g whole groups, each a [tile_n, g] SMEM tile the kernel slices without
crossing a swizzle tile. So

    a @ w = sum_G scales_G * (a_G @ codes_G^T) + (per-group sums of a) @ offsets

Small M (M <= ``KERNEL_M_MAX``) runs ``matmul``'s warp-specialized small-M kernel: a memory
warpgroup TMA-streams the codes and their scales, each compute warpgroup converts its rows of a
group int4 -> bf16 in registers (the GPU interpreter stages them through SMEM), multiplies them with
the tokens into a fresh wgmma accumulator and adds it, scaled per output channel, to its running
sum; split-K partial sums are added in XLA, with the offsets' term, a [M, G] @ [G, N] XLA dot.
Larger M: the codes are dequantized once to bf16 in XLA and multiplied by ``matmul`` (compute-bound
prefill: its prefill kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import matmul as bf16_matmul
from pallas_kernels import tuning

GROUP_SIZES = (64, 128)
# The group-scaled small-M kernel runs M <= 16: verified on an H100 at M = 1 and 16, while the GLM-4
# gate_up test at M = 64 failed there (2026-11-26, not diagnosed). Larger M dequantizes to bf16 in XLA
# and runs ``matmul`` (its small-M kernel up to 128 rows, its prefill kernel beyond).
KERNEL_M_MAX = 16
CODE_DTYPE = jnp.dtype(jnp.int4)
_TILE_KS = (512, 256, 128, 64)  # widest first: 32 KiB of codes per 128-channel step at 512


# The small-M kernel's tiles, as for bf16 weights (tile_m unused): tile_n output channels per CTA over
# two compute warpgroups, tile_k a multiple of the group size, num_stages, num_k_splits.
Int4MatmulConfig = bf16_matmul.MatmulConfig


def weight_itemsize(group_size: int) -> float:
    """Bytes streamed per weight: half a byte of code and its share of the group's f32 scale."""
    return 0.5 + 4 / group_size


def shape_key(m: int, k: int, n: int, group_size: int) -> str:
    return f"{bf16_matmul.shape_key(m, k, n)}_G{group_size}"


def default_config(m: int, k: int, n: int, group_size: int) -> Int4MatmulConfig:
    """Tuned config for (M, K, N, group size) on the current card, else a heuristic (never fails)."""
    tuned = tuning.lookup("int4_matmul", CODE_DTYPE, shape_key(m, k, n, group_size))
    if tuned is not None:
        return Int4MatmulConfig(**tuned)
    if m > KERNEL_M_MAX or group_size not in GROUP_SIZES:  # tiles unused, or the shape check says no
        return Int4MatmulConfig()
    tile_ks = tuple(t for t in _TILE_KS if t % group_size == 0)
    return Int4MatmulConfig(**bf16_matmul.small_m_heuristic(m, k, n, weight_itemsize(group_size), tile_ks))


def _shape_error(m: int, k: int, n: int, group_size: int, config: Int4MatmulConfig, out_dtype) -> str | None:
    """Why (M, K, N, group size) with output ``out_dtype`` does not fit ``config``, or None when it does."""
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} must be one of {GROUP_SIZES}"
    if k % group_size:
        return f"K={k} must be a multiple of the group size {group_size}"
    error = bf16_matmul.out_dtype_error(m, out_dtype)
    if error is not None or m > KERNEL_M_MAX:  # dequantized: matmul checks its own tiles
        return error
    if config.tile_k % group_size:
        return f"{config.tile_k=} must be a multiple of the group size {group_size}"
    return bf16_matmul.small_m_shape_error(m, k, n, config, weight_itemsize(group_size))


def supports(m: int, k: int, n: int, activation_dtype, group_size: int, out_dtype=None) -> bool:
    """Whether bf16 [M, K] @ int4 [K, N] in groups of ``group_size`` -> ``out_dtype`` (None = bf16) fits
    this kernel with its default config (and, for large M, ``matmul``'s prefill kernel); the model's
    ``matmul_backend`` dispatch falls back to XLA otherwise."""
    if jnp.dtype(activation_dtype) != jnp.dtype(jnp.bfloat16) or min(m, k, n) <= 0:
        return False
    config = default_config(m, k, n, group_size)
    if _shape_error(m, k, n, group_size, config, out_dtype or activation_dtype) is not None:
        return False
    return m <= KERNEL_M_MAX or bf16_matmul.supports(m, k, n, jnp.bfloat16, out_dtype or activation_dtype)


def _check_args(a, codes, scales, offsets, config: Int4MatmulConfig, out_dtype):
    if a.ndim != 2 or codes.ndim != 3:
        raise ValueError(f"a must be [M, K] and codes [G, N, g], got {a.shape=} {codes.shape=}")
    m, k = a.shape
    groups, n, group_size = codes.shape
    if groups * group_size != k:
        raise ValueError(f"contraction mismatch: {a.shape=} vs {codes.shape=} ({groups} groups of {group_size})")
    if a.dtype != jnp.bfloat16:
        raise ValueError(f"a must be bfloat16, got {a.dtype=}")
    if codes.dtype != CODE_DTYPE:
        raise ValueError(f"codes dtype {codes.dtype} must be int4")
    for name, arr in (("scales", scales), ("offsets", offsets)):
        if arr is not None and (arr.shape != (groups, n) or arr.dtype != jnp.float32):
            raise ValueError(f"{name} must be float32 [G, N] = {(groups, n)}, one per group and output channel; "
                             f"got {arr.shape} {arr.dtype}")
    error = _shape_error(m, k, n, group_size, config, out_dtype)
    if error is not None:
        raise ValueError(error)


def dequantize(codes, scales, offsets=None, dtype=jnp.float32):
    """codes [G, N, g] with scales / offsets [G, N] -> w [K, N] in ``dtype`` (the layout ``matmul`` takes)."""
    groups, n, group_size = codes.shape
    w = codes.astype(jnp.float32) * scales[..., None]
    if offsets is not None:
        w = w + offsets[..., None]
    return jnp.swapaxes(w, 1, 2).reshape(groups * group_size, n).astype(dtype)


def group_sums(a, group_size: int):
    """a [M, K] -> [M, G] float32: the sum of each token's activations over each group."""
    m, k = a.shape
    return a.astype(jnp.float32).reshape(m, k // group_size, group_size).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def int4_matmul(a, codes, scales, offsets=None, config: Int4MatmulConfig | None = None, out_dtype=None):
    """a [M, K] bf16 @ w [K, N] -> [M, N] in out_dtype (f32 accumulation), w given per group of g by
    codes [G, N, g] int4, scales [G, N] f32 and offsets [G, N] f32 (None = 0): see the module docstring.
    out_dtype: None = bfloat16; float32 (the unrounded sums) only for M <= matmul.SMALL_M_MAX."""
    m, k = a.shape
    n, group_size = codes.shape[1:] if codes.ndim == 3 else (0, 0)
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if config is None:
        config = default_config(m, k, n, group_size)
    _check_args(a, codes, scales, offsets, config, out_dtype)
    if m > KERNEL_M_MAX:
        return bf16_matmul.matmul(a, dequantize(codes, scales, offsets, jnp.bfloat16), out_dtype=out_dtype)
    partial_sums = bf16_matmul.small_m_partial_sums(a, codes, config, group_scales=scales)  # [S, N, Mp]
    offset_term = None if offsets is None else (
        lambda out: out + jnp.dot(group_sums(a, group_size), offsets, precision=lax.Precision.HIGHEST))
    return bf16_matmul.small_m_result(partial_sums, m, out_dtype, offset_term)


def int4_matmul_reference(a, codes, scales, offsets=None):
    """Float32 reference: a @ dequantize(codes, scales, offsets)."""
    return jnp.dot(a.astype(jnp.float32), dequantize(codes, scales, offsets), precision=lax.Precision.HIGHEST)
