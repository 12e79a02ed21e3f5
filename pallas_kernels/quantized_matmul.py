"""Weight-only quantized matmul for Hopper (Mosaic GPU): int8 / fp8-e4m3 weights, per-channel scales.

Owns: ``quantized_matmul(a [M, K] bf16, w_q [N, K] int8|float8_e4m3fn, scale [N] f32) -> [M, N] bf16``,
its kernel, a float32 reference (dequantize, then matmul) and the tuning config. It does not own
quantizing weights (``autoglm_jax.quant``) nor the bf16 matmul (``matmul``).

Weights are stored out-feature major ([N, K], like a torch Linear) and read from HBM in their
narrow type: one byte per weight, half the bytes of bf16, which is the whole point at decode
sizes where the matmul is bound by reading weights. Like ``matmul``'s small-M kernel the product
is computed transposed, ``out^T [N, M] = w [N, K] @ a^T [K, M]``: each step TMA-loads a
tile_n x tile_k int8 tile, converts it to bf16 in registers, stores it to a bf16 SMEM tile
(wgmma's A operand) and runs the wgmma against the token tile. The per-channel scale multiplies
the f32 partial sums in the XLA epilogue that also adds the split-K partials and transposes.

Large M (prefill, M > ``matmul.SMALL_M_MAX``) is compute-bound, so the wrapper dequantizes the
weights once to bf16 in XLA and uses ``matmul``'s prefill kernel.
Not yet: int4 with group scales (issue 4, second pass).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import matmul as bf16_matmul
from pallas_kernels import tuning
from pallas_kernels._smem import smem_transforms

WEIGHT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
_M_ALIGN = 32
SMEM_BUDGET = 220 * 1024  # bytes; Hopper allows 227 KiB of dynamic SMEM per CTA


@dataclasses.dataclass(frozen=True)
class QuantizedMatmulConfig:
    """tile_n: output channels per CTA (wgmma M, 64 or 128); tile_k: contraction per step (a
    multiple of 128, one 128-byte int8 row); num_stages: TMA buffers; num_k_splits: split-K."""

    tile_n: int = 128
    tile_k: int = 128
    num_stages: int = 4
    num_k_splits: int = 1

    def __post_init__(self):
        if self.tile_n not in (64, 128):
            raise ValueError(f"{self.tile_n=} must be 64 or 128")
        if self.tile_k % 128 or self.tile_k <= 0:
            raise ValueError(f"{self.tile_k=} must be a positive multiple of 128")
        if self.num_stages < 2:
            raise ValueError(f"{self.num_stages=} must be >= 2")
        if self.num_k_splits < 1:
            raise ValueError(f"{self.num_k_splits=} must be >= 1")


def default_config(m: int, k: int, n: int, weight_dtype) -> QuantizedMatmulConfig:
    """Tuned config for (M, K, N, weight dtype) on the current card, else a heuristic."""
    tuned = tuning.lookup("quantized_matmul", weight_dtype, f"M{m}_K{k}_N{n}")
    if tuned is not None:
        return QuantizedMatmulConfig(**tuned)
    tile_n, tile_k = (128 if m <= 64 else 64), 128
    splits = tuning.split_k(pl.cdiv(n, tile_n), k // tile_k)
    for stages in (6, 5, 4, 3, 2):  # deepest pipeline that fits in SMEM
        config = QuantizedMatmulConfig(tile_n=tile_n, tile_k=tile_k, num_stages=stages, num_k_splits=splits)
        if smem_bytes(config, m) <= SMEM_BUDGET:
            return config
    return config


def smem_bytes(config: QuantizedMatmulConfig, m: int) -> int:
    """SMEM one CTA needs: pipelined token and weight tiles, the bf16 dequantized tile, the f32 output tile."""
    m_pad = pl.cdiv(m, _M_ALIGN) * _M_ALIGN
    stages = config.num_stages * (m_pad * config.tile_k * 2 + config.tile_n * config.tile_k)
    return stages + config.tile_n * config.tile_k * 2 + config.tile_n * m_pad * 4


def _kernel(a_ref, w_ref, out_ref, w_bf16_smem, out_smem, *, config: QuantizedMatmulConfig):
    # a_ref [Mp, K] bf16, w_ref [N, K] int8|fp8, out_ref [S, N, Mp] f32 unscaled partial sums of out^T
    # w_bf16_smem [tile_n, tile_k] bf16 (dequantized A operand), out_smem [tile_n, Mp] f32
    tile_n, tile_k, splits = config.tile_n, config.tile_k, config.num_k_splits
    m_pad, k = a_ref.shape
    n_idx, split = lax.axis_index("n"), lax.axis_index("split")
    k_per_split = k // splits
    k_slice = pl.ds(split * k_per_split, k_per_split)

    def acc_scope(acc_ref):  # acc_ref [tile_n, Mp] f32
        def step(_, a_smem, w_smem):  # a_smem [Mp, tile_k] bf16, w_smem [tile_n, tile_k] narrow
            w = w_smem[...]
            if w.dtype != jnp.int8:  # Hopper converts fp8 only to f16/f32 (with this ptxas): go via f32
                w = w.astype(jnp.float32)
            w_bf16_smem[...] = w.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, w_bf16_smem, a_smem.T)
            plgpu.wgmma_wait(0)  # w_bf16_smem and the pipeline slots are rewritten next step

        plgpu.emit_pipeline(
            step,
            grid=(k_per_split // tile_k,),
            in_specs=[
                plgpu.BlockSpec((m_pad, tile_k), lambda kk: (0, kk), transforms=smem_transforms(tile_k, a_ref.dtype)),
                plgpu.BlockSpec((tile_n, tile_k), lambda kk: (0, kk), transforms=smem_transforms(tile_k, w_ref.dtype)),
            ],
            max_concurrent_steps=config.num_stages,
        )(a_ref.at[:, k_slice], w_ref.at[pl.ds(n_idx * tile_n, tile_n), k_slice])
        return acc_ref[...]

    out_smem[...] = pl.run_scoped(acc_scope, plgpu.ACC((tile_n, m_pad), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[split, pl.ds(n_idx * tile_n, tile_n)])
    plgpu.wait_smem_to_gmem(0)


def _shape_error(m: int, k: int, n: int, config: QuantizedMatmulConfig, out_dtype) -> str | None:
    """Why (M, K, N) with output ``out_dtype`` does not fit ``config``'s tiles and SMEM, or None when it does."""
    if jnp.dtype(out_dtype) not in bf16_matmul.OUT_DTYPES:
        return f"out_dtype={jnp.dtype(out_dtype).name} must be one of {[d.name for d in bf16_matmul.OUT_DTYPES]}"
    if m > bf16_matmul.SMALL_M_MAX and jnp.dtype(out_dtype) != jnp.dtype(jnp.bfloat16):
        return f"large M ({m=}) runs matmul's prefill kernel, which writes bfloat16 only"
    if n % config.tile_n:
        return f"{config.tile_n=} must divide {n=}"
    if k % (config.tile_k * config.num_k_splits):
        return f"{config.tile_k=} * {config.num_k_splits=} must divide {k=}"
    if m <= bf16_matmul.SMALL_M_MAX and smem_bytes(config, m) > SMEM_BUDGET:
        return f"{config=} needs {smem_bytes(config, m)} bytes of SMEM > {SMEM_BUDGET} at {m=}"
    return None


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
    m_pad = pl.cdiv(m, _M_ALIGN) * _M_ALIGN
    splits = config.num_k_splits
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config),
        out_type=jax.ShapeDtypeStruct((splits, n, m_pad), jnp.float32),
        scratch_types=(
            plgpu.SMEM((config.tile_n, config.tile_k), jnp.bfloat16, transforms=smem_transforms(config.tile_k, jnp.bfloat16)),
            plgpu.SMEM((config.tile_n, m_pad), jnp.float32, transforms=smem_transforms(m_pad, jnp.float32)),
        ),
        grid=(n // config.tile_n, splits),
        grid_names=("n", "split"),
    )
    partial_sums = kernel(jnp.pad(a, ((0, m_pad - m), (0, 0))), w_q)  # [S, N, Mp]
    out_t = partial_sums.sum(axis=0) * scale[:, None].astype(jnp.float32)
    return out_t[:, :m].T.astype(out_dtype)


def quantized_matmul_reference(a, w_q, scale):
    """Float32 reference: a @ dequantize(w_q, scale)."""
    return jnp.dot(a.astype(jnp.float32), dequantize(w_q, scale), precision=lax.Precision.HIGHEST)
