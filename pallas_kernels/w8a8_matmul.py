"""W8A8 matmul for Hopper: 8-bit tokens x 8-bit weights (fp8 e4m3 x e4m3, or int8 x int8), per-row scales.

Owns: ``w8a8_matmul(a_q [M, K], a_scale [M] f32, w_q [N, K], w_scale [N] f32) -> [M, N]`` (a_q and w_q
both float8_e4m3fn or both int8), a float32 reference, the tuning config with its table lookup and
heuristic, and ``supports``. It does not own quantizing the tokens (``autoglm_jax.quant.channel``
quantizes each token row at run time) nor the weights, nor the model's dispatch (``matmul_backend``).

Weights are stored out-feature major ([N, K], K-major), the layout both paths read without a transpose:
  * small M (decode, M <= ``matmul.SMALL_M_MAX``): ``matmul``'s warp-specialized small-M kernel
    (``small_m_partial_sums``) with 8-bit tokens: the memory warpgroup TMA-streams tile_n x tile_k weight
    tiles and the [Mp, tile_k] token tile, both one byte an element, and each compute warpgroup issues
    e4m3 x e4m3 (f32 accumulator) or s8 x s8 (int32 accumulator) wgmma with both operands K-major
    straight from SMEM (128-byte swizzle = 128 elements a row; the wgmma K step is 32), so nothing is
    converted in registers. Hopper's fp8 wgmma accumulates with reduced precision inside one
    instruction chain (like cuBLASLt's fast-accumulation mode), far below the e4m3 rounding of the
    operands. The split-K partial sums (int32 for int8: exact) are added in XLA, converted to f32 and
    scaled ``acc * a_scale[m] * w_scale[n]`` in the same epilogue that transposes.
  * large M (prefill, M > ``matmul.SMALL_M_MAX``): compute-bound, so XLA's ``dot_general`` contracting
    dim 1 of both operands: XLA compiles it to cuBLASLt's fp8 / int8 GEMM, which takes [N, K] without the
    per-call weight transpose that a [K, N] weight costs (benchmarks/w8a8_gemm.py). No Pallas kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import matmul as bf16_matmul
from pallas_kernels import tuning
from pallas_kernels.quantized_matmul import QuantizedMatmulConfig

DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.int8))  # a_q and w_q share one of these
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


# Small-M tiles, the fields and checks of the weight-only kernel's config (the same small-M kernel runs
# both): tile_n (128 or 256 channels per CTA), tile_k (a multiple of 128: one 128-byte swizzled row of
# 8-bit elements), num_stages, num_k_splits. Unused for large M (XLA).
W8A8MatmulConfig = QuantizedMatmulConfig


def heuristic_config(m: int, k: int, n: int) -> dict:
    """Untuned small-M tile fields: ``matmul.small_m_heuristic`` for one-byte weights and tokens (tile_k >= 128)."""
    return bf16_matmul.small_m_heuristic(m, k, n, weight_itemsize=1, tile_ks=(256, 128), activation_itemsize=1)


def default_config(m: int, k: int, n: int, dtype) -> W8A8MatmulConfig:
    """Tuned config for (M, K, N, dtype) on the current card (``tuning/w8a8_matmul.json``), else the heuristic."""
    if m > bf16_matmul.SMALL_M_MAX:  # XLA: the tiles are not used
        return W8A8MatmulConfig()
    tuned = tuning.lookup("w8a8_matmul", dtype, bf16_matmul.shape_key(m, k, n))
    return W8A8MatmulConfig(**(tuned if tuned is not None else heuristic_config(m, k, n)))


def _shape_error(m: int, k: int, n: int, config: W8A8MatmulConfig, out_dtype) -> str | None:
    """Why (M, K, N) with output ``out_dtype`` does not fit ``config``'s tiles and SMEM, or None when it does."""
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        return f"out_dtype={jnp.dtype(out_dtype).name} must be one of {[d.name for d in OUT_DTYPES]}"
    if min(m, k, n) <= 0:
        return f"empty matmul: {m=} {k=} {n=}"
    if m > bf16_matmul.SMALL_M_MAX:  # XLA's GEMM takes any shape
        return None
    return bf16_matmul.small_m_shape_error(m, k, n, config, weight_itemsize=1, activation_itemsize=1)


def supports(m: int, k: int, n: int, dtype, out_dtype=jnp.bfloat16) -> bool:
    """Whether 8-bit ``dtype`` [M, K] x [N, K]^T -> ``out_dtype`` fits this kernel with its default config
    (any large M does: XLA); the model's ``matmul_backend`` dispatch uses its XLA rule otherwise."""
    if jnp.dtype(dtype) not in DTYPES:
        return False
    return _shape_error(m, k, n, default_config(m, k, n, dtype), out_dtype) is None


def _check_args(a_q, a_scale, w_q, w_scale, config: W8A8MatmulConfig, out_dtype):
    if a_q.ndim != 2 or w_q.ndim != 2:
        raise ValueError(f"a_q must be [M, K] and w_q [N, K], got {a_q.shape=} {w_q.shape=}")
    m, k = a_q.shape
    n, k2 = w_q.shape
    if k != k2:
        raise ValueError(f"contraction mismatch: {a_q.shape=} vs {w_q.shape=} (w_q is [N, K])")
    if jnp.dtype(a_q.dtype) not in DTYPES or a_q.dtype != w_q.dtype:
        raise ValueError(f"a_q and w_q must both be one of {[d.name for d in DTYPES]}, got {a_q.dtype=} {w_q.dtype=}")
    if a_scale.shape != (m,) or w_scale.shape != (n,):
        raise ValueError(f"{a_scale.shape=} must be ({m},) (one scale per token) and {w_scale.shape=} ({n},) "
                         "(one per output channel)")
    error = _shape_error(m, k, n, config, out_dtype)
    if error is not None:
        raise ValueError(error)


def _scaled(acc, a_scale, w_scale):
    """acc [M, N] int32 | f32 -> f32 (acc * a_scale[m]) * w_scale[n], in the order of the model's XLA rule."""
    return acc.astype(jnp.float32) * a_scale[:, None].astype(jnp.float32) * w_scale[None, :].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def w8a8_matmul(a_q, a_scale, w_q, w_scale, config: W8A8MatmulConfig | None = None, out_dtype=jnp.bfloat16):
    """a_q [M, K] @ w_q [N, K]^T (both fp8 e4m3 or both int8), scaled by a_scale [M] and w_scale [N] (f32)
    -> [M, N] in out_dtype (bfloat16 or float32, the unrounded scaled sums). Small M: the Pallas kernel;
    large M: XLA's GEMM on the [N, K] weight."""
    out_dtype = jnp.dtype(out_dtype)
    if config is None:
        config = default_config(a_q.shape[0], a_q.shape[-1], w_q.shape[0], a_q.dtype)
    _check_args(a_q, a_scale, w_q, w_scale, config, out_dtype)
    m = a_q.shape[0]
    acc_dtype = jnp.int32 if a_q.dtype == jnp.int8 else jnp.float32
    if m > bf16_matmul.SMALL_M_MAX:
        acc = lax.dot_general(a_q, w_q, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)  # [M, N]
        return _scaled(acc, a_scale, w_scale).astype(out_dtype)
    partial_sums = bf16_matmul.small_m_partial_sums(a_q, w_q, config, weights_nk=True)  # [S, N, Mp]
    return bf16_matmul.small_m_result(partial_sums, m, out_dtype, lambda acc: _scaled(acc, a_scale, w_scale))


def w8a8_matmul_reference(a_q, a_scale, w_q, w_scale):
    """Float32 reference: (a_q * a_scale[:, None]) @ (w_q * w_scale[:, None])^T."""
    a = a_q.astype(jnp.float32) * a_scale[:, None]
    w = w_q.astype(jnp.float32) * w_scale[:, None]
    return jnp.dot(a, w.T, precision=lax.Precision.HIGHEST)
