"""Weight-only quantized matmul for Hopper (Mosaic GPU): int8 / fp8-e4m3 weights, per-channel scales.

Owns: ``quantized_matmul(a [M, K] bf16, w_q [N, K] int8|float8_e4m3fn, scale [N] f32) -> [M, N] bf16``,
its kernel, a float32 reference (dequantize, then matmul) and the tuning config. It does not own
quantizing weights (``autoglm_jax.quant``) nor the bf16 matmul (``matmul``).

Weights are stored out-feature major ([N, K], like a torch Linear) and read from HBM in their
narrow type: one byte per weight, half the bytes of bf16, which is the whole point at decode
sizes where the matmul is bound by reading weights. Small M (M <= ``matmul.SMALL_M_MAX``) runs
``matmul``'s warp-specialized small-M kernel (``small_m_partial_sums``): a memory warpgroup
TMA-streams tile_n x tile_k int8/fp8 tiles, each of two compute warpgroups loads its half into
registers 4 bytes a thread, converts them to f16 there (exact) and feeds them, as they lie, to wgmma as
the A operand against the token tile: the tokens, f16 times 2^-8, K permuted to match (``_narrow_operand``:
no data moves between threads; the GPU interpreter, which runs wgmma only from SMEM, stages the
f16 tile through SMEM instead, in the same K order). The per-channel scale multiplies the f32
sums in the XLA epilogue that also adds the split-K partials and transposes (``matmul.small_m_result``).

Large M (prefill, M > ``matmul.SMALL_M_MAX``) is compute-bound, so the wrapper dequantizes the
weights once to bf16 in XLA and uses ``matmul``'s prefill kernel.
Group-scaled int4 weights: ``int4_matmul``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import matmul as bf16_matmul
from pallas_kernels import tuning

WEIGHT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


@dataclasses.dataclass(frozen=True)
class QuantizedMatmulConfig:
    """tile_n: output channels per CTA (128 or 256, split over two compute warpgroups); tile_k:
    contraction per step (a multiple of 128, one 128-byte int8 row); num_stages: TMA buffers;
    num_k_splits: split-K."""

    tile_n: int = 128
    tile_k: int = 128
    num_stages: int = 4
    num_k_splits: int = 1

    def __post_init__(self):
        if self.tile_n not in (128, 256):
            raise ValueError(f"{self.tile_n=} must be 128 or 256")
        if self.tile_k % 128 or self.tile_k <= 0:
            raise ValueError(f"{self.tile_k=} must be a positive multiple of 128")
        if self.num_stages < 2:
            raise ValueError(f"{self.num_stages=} must be >= 2")
        if self.num_k_splits < 1:
            raise ValueError(f"{self.num_k_splits=} must be >= 1")


def default_config(m: int, k: int, n: int, weight_dtype) -> QuantizedMatmulConfig:
    """Tuned config for (M, K, N, weight dtype) on the current card, else a heuristic."""
    tuned = tuning.lookup("quantized_matmul", weight_dtype, bf16_matmul.shape_key(m, k, n))
    if tuned is not None:
        return QuantizedMatmulConfig(**tuned)
    if m > bf16_matmul.SMALL_M_MAX:  # dequantize + the prefill kernel: these tiles are not used
        return QuantizedMatmulConfig()
    fields = bf16_matmul.small_m_heuristic(m, k, n, weight_itemsize=1)
    fields["tile_k"] = max(fields["tile_k"], 128)  # K not a multiple of 128: the shape check says so
    return QuantizedMatmulConfig(**fields)


def _shape_error(m: int, k: int, n: int, config: QuantizedMatmulConfig, out_dtype) -> str | None:
    """Why (M, K, N) with output ``out_dtype`` does not fit ``config``'s tiles and SMEM, or None when it does."""
    error = bf16_matmul.out_dtype_error(m, out_dtype)
    if error is not None or m > bf16_matmul.SMALL_M_MAX:  # large M: matmul's prefill kernel checks its own tiles
        return error
    return bf16_matmul.small_m_shape_error(m, k, n, config, weight_itemsize=1)


def supports(m: int, k: int, n: int, activation_dtype, weight_dtype, out_dtype=None) -> bool:
    """Whether bf16 [M, K] @ narrow [N, K]^T -> ``out_dtype`` (None = bf16) fits this kernel with its
    default config (and, for large M, ``matmul``'s prefill kernel); the model's ``matmul_backend``
    dispatch falls back to XLA otherwise."""
    if jnp.dtype(activation_dtype) != jnp.dtype(jnp.bfloat16) or jnp.dtype(weight_dtype) not in WEIGHT_DTYPES:
        return False
    config = default_config(m, k, n, weight_dtype) if min(m, k, n) > 0 else None
    if config is None or _shape_error(m, k, n, config, out_dtype or activation_dtype) is not None:
        return False
    return m <= bf16_matmul.SMALL_M_MAX or bf16_matmul.supports(m, k, n, jnp.bfloat16)


def _check_args(a, w_q, scale, config: QuantizedMatmulConfig, out_dtype):
    if a.ndim != 2 or w_q.ndim != 2:
        raise ValueError(f"a must be [M, K] and w_q [N, K], got {a.shape=} {w_q.shape=}")
    m, k = a.shape
    n, k2 = w_q.shape
    if k != k2:
        raise ValueError(f"contraction mismatch: {a.shape=} vs {w_q.shape=} (w_q is [N, K])")
    if a.dtype != jnp.bfloat16:
        raise ValueError(f"a must be bfloat16, got {a.dtype=}")
    if jnp.dtype(w_q.dtype) not in WEIGHT_DTYPES:
        raise ValueError(f"w_q dtype {w_q.dtype} must be one of {[d.name for d in WEIGHT_DTYPES]}")
    if scale.shape != (n,):
        raise ValueError(f"{scale.shape=} must be ({n},), one scale per output channel")
    error = _shape_error(m, k, n, config, out_dtype)
    if error is not None:
        raise ValueError(error)


def dequantize(w_q, scale, dtype=jnp.float32):
    """[N, K] narrow weights x per-channel scale -> [K, N] in ``dtype`` (the layout ``matmul`` takes)."""
    return (w_q.astype(jnp.float32) * scale[:, None].astype(jnp.float32)).T.astype(dtype)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def quantized_matmul(a, w_q, scale, config: QuantizedMatmulConfig | None = None, out_dtype=None):
    """a [M, K] bf16 @ dequant(w_q [N, K], scale [N])^T -> [M, N] in out_dtype (f32 accumulation).
    out_dtype: None = bfloat16; float32 (the unrounded scaled sums) only for M <= SMALL_M_MAX."""
    m, k = a.shape
    n = w_q.shape[0]
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if config is None:
        config = default_config(m, k, n, w_q.dtype)
    _check_args(a, w_q, scale, config, out_dtype)
    if m > bf16_matmul.SMALL_M_MAX:
        return bf16_matmul.matmul(a, dequantize(w_q, scale, jnp.bfloat16))
    partial_sums = bf16_matmul.small_m_partial_sums(a, w_q, config, weights_nk=True)  # [S, N, Mp]
    return bf16_matmul.small_m_result(partial_sums, m, out_dtype, lambda out: out * scale.astype(jnp.float32))


def quantized_matmul_reference(a, w_q, scale):
    """Float32 reference: a @ dequantize(w_q, scale)."""
    return jnp.dot(a.astype(jnp.float32), dequantize(w_q, scale), precision=lax.Precision.HIGHEST)
