"""bf16 x bf16 -> bf16 Tensor-Core matmul for Hopper (Mosaic GPU, wgmma + TMA), f32 accumulation.

Owns: ``matmul(a [M, K], w [K, N]) -> [M, N]`` for the projection shapes of the model, its two
kernels, a float32 reference and the tuning config. It does not own quantized weights
(``quantized_matmul``) nor choosing between this and XLA (the model's dispatch does).

Two kernels, picked by M:
  * small M (decode, M <= ``SMALL_M_MAX``): memory-bound on the weights. Computed as
    ``out^T [N, M] = w^T [N, K] @ a^T [K, M]`` so the large N fills the wgmma M side (64 rows
    per warpgroup) and the few tokens are the wgmma N side (padded to a multiple of 32).
    Grid (N / tile_n, num_k_splits): split-K gives enough CTAs to stream the weights from every
    SM; partial sums (f32) are added and transposed in XLA (a few hundred KB).
  * large M (prefill): compute-bound. A persistent, warp-specialized kernel: one memory
    warpgroup streams (tile_m x tile_k, tile_k x 2*tile_n) tiles ``num_stages`` deep, two compute
    warpgroups each own a tile_m x tile_n accumulator; bf16 epilogue through SMEM and TMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tuning
from pallas_kernels._smem import smem_transforms

SMALL_M_MAX = 128
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))  # float32: small-M kernel only
_SMALL_M_ALIGN = 32  # wgmma N for the token side; 32 f32 = one 128-byte swizzle row


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes. Small-M kernel: tile_n (wgmma M, 64/128), tile_k, num_stages, num_k_splits.
    Large-M kernel: tile_m x tile_n per compute warpgroup (CTA tile tile_m x 2*tile_n), tile_k,
    num_stages; epilogue in 64 x 64 pieces."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    num_stages: int = 4
    num_k_splits: int = 1

    def __post_init__(self):
        for name in ("tile_m", "tile_n", "tile_k"):
            value = getattr(self, name)
            if value % 64 or value <= 0:
                raise ValueError(f"{name}={value} must be a positive multiple of 64")
        if self.num_stages < 2:
            raise ValueError(f"{self.num_stages=} must be >= 2")
        if self.num_k_splits < 1:
            raise ValueError(f"{self.num_k_splits=} must be >= 1")


def default_config(m: int, k: int, n: int, dtype) -> MatmulConfig:
    """Tuned config for (M, K, N) on the current card, else a heuristic (never fails)."""
    tuned = tuning.lookup("matmul", dtype, f"M{m}_K{k}_N{n}")
    if tuned is not None:
        return MatmulConfig(**tuned)
    if m <= SMALL_M_MAX:
        tile_n = 128 if m <= 64 else 64
        tile_k = 128 if k % 128 == 0 else 64
        splits = tuning.split_k(pl.cdiv(n, tile_n), k // tile_k)
        return MatmulConfig(tile_n=tile_n, tile_k=tile_k, num_stages=4, num_k_splits=splits)
    tile_n = 128 if n % 256 == 0 else 64
    return MatmulConfig(tile_m=128, tile_n=tile_n, tile_k=64, num_stages=4)


def _small_m_kernel(a_ref, w_ref, out_ref, out_smem, *, config: MatmulConfig):
    # a_ref [Mp, K], w_ref [K, N], out_ref [S, N, Mp] f32 partial sums of out^T, out_smem [tile_n, Mp] f32
    tile_n, tile_k, splits = config.tile_n, config.tile_k, config.num_k_splits
    m_pad, k = a_ref.shape
    n_idx, split = lax.axis_index("n"), lax.axis_index("split")
    k_per_split = k // splits
    k_slice = pl.ds(split * k_per_split, k_per_split)

    def acc_scope(acc_ref):  # acc_ref [tile_n, Mp] f32
        def step(_, a_smem, w_smem):  # a_smem [Mp, tile_k], w_smem [tile_k, tile_n]
            plgpu.wgmma(acc_ref, w_smem.T, a_smem.T)
            plgpu.wgmma_wait(0)  # the pipeline refills these SMEM slots next

        plgpu.emit_pipeline(
            step,
            grid=(k_per_split // tile_k,),
            in_specs=[
                plgpu.BlockSpec((m_pad, tile_k), lambda kk: (0, kk), transforms=smem_transforms(tile_k, a_ref.dtype)),
                plgpu.BlockSpec((tile_k, tile_n), lambda kk: (kk, 0), transforms=smem_transforms(tile_n, w_ref.dtype)),
            ],
            max_concurrent_steps=config.num_stages,
        )(a_ref.at[:, k_slice], w_ref.at[k_slice, pl.ds(n_idx * tile_n, tile_n)])
        return acc_ref[...]

    out_smem[...] = pl.run_scoped(acc_scope, plgpu.ACC((tile_n, m_pad), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[split, pl.ds(n_idx * tile_n, tile_n)])
    plgpu.wait_smem_to_gmem(0)


def _matmul_small_m(a, w, config: MatmulConfig, out_dtype):
    m, k = a.shape
    n = w.shape[1]
    m_pad = pl.cdiv(m, _SMALL_M_ALIGN) * _SMALL_M_ALIGN
    a_pad = jnp.pad(a, ((0, m_pad - m), (0, 0)))
    splits = config.num_k_splits
    kernel = plgpu.kernel(
        functools.partial(_small_m_kernel, config=config),
        out_type=jax.ShapeDtypeStruct((splits, n, m_pad), jnp.float32),
        scratch_types=(plgpu.SMEM((config.tile_n, m_pad), jnp.float32, transforms=smem_transforms(m_pad, jnp.float32)),),
        grid=(n // config.tile_n, splits),
        grid_names=("n", "split"),
    )
    partial_sums = kernel(a_pad, w)  # [S, N, Mp]
    return partial_sums.sum(axis=0)[:, :m].T.astype(out_dtype)


def _large_m_kernel(a_ref, w_ref, out_ref, *, config: MatmulConfig, num_ctas: int):
    # a_ref [M, K], w_ref [K, N], out_ref [M, N]
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    epi = 64
    m, k = a_ref.shape
    n = w_ref.shape[1]
    cta_n = 2 * tile_n
    m_iters, n_iters = m // tile_m, n // cta_n

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tile_k,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tile_m, tile_k), lambda kk: (0, kk), transforms=smem_transforms(tile_k, a_ref.dtype),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), transforms=smem_transforms(cta_n, w_ref.dtype),
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=config.num_stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(a_ref, w_ref),
        out_smem=plgpu.SMEM((2, 2, epi, epi), out_ref.dtype, transforms=smem_transforms(epi, out_ref.dtype)),
        collective_axes="wg",
    )
    def scope(allocations, out_smem):  # out_smem [compute wg, slot, 64, 64]
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cta")
        def tile_loop(info: plgpu.NDLoopInfo):
            m_idx, n_idx = plgpu.planar_snake(info.index[0], (m_iters, n_iters), 1, 8)
            m_slice = pl.ds(m_idx * tile_m, tile_m)
            n_slice = pl.ds(n_idx * cta_n + wg * tile_n, tile_n)

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def acc_scope(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...].astype(out_ref.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for i in range(tile_m // epi):
                        for j in range(tile_n // epi):
                            slot = (i * (tile_n // epi) + j) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = acc[i * epi:(i + 1) * epi, j * epi:(j + 1) * epi]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_ref.at[m_slice, n_slice].at[pl.ds(i * epi, epi), pl.ds(j * epi, epi)],
                            )

            def step(_, a_smem, w_smem, acc_ref):  # a_smem [tile_m, tile_k], w_smem [tile_k, 2*tile_n]
                plgpu.wgmma(acc_ref, a_smem, w_smem.at[:, pl.ds(wg * tile_n, tile_n)])
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(step, compute_context)(
                a_ref.at[m_slice, :], w_ref.at[:, pl.ds(n_idx * cta_n, cta_n)], allocations=allocations
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _matmul_large_m(a, w, config: MatmulConfig):
    m, k = a.shape
    n = w.shape[1]
    m_pad = pl.cdiv(m, config.tile_m) * config.tile_m
    a_pad = jnp.pad(a, ((0, m_pad - m), (0, 0))) if m_pad != m else a
    num_ctas = tuning.num_sms()
    kernel = plgpu.kernel(
        functools.partial(_large_m_kernel, config=config, num_ctas=num_ctas),
        out_type=jax.ShapeDtypeStruct((m_pad, n), a.dtype),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(a_pad, w)[:m]


def _shape_error(m: int, k: int, n: int, config: MatmulConfig, out_dtype) -> str | None:
    """Why (M, K, N) with output ``out_dtype`` does not fit ``config``'s tiles, or None when it does."""
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        return f"out_dtype={jnp.dtype(out_dtype).name} must be one of {[d.name for d in OUT_DTYPES]}"
    if m <= SMALL_M_MAX:
        if n % config.tile_n:
            return f"{config.tile_n=} must divide {n=}"
        if k % (config.tile_k * config.num_k_splits):
            return f"{config.tile_k=} * {config.num_k_splits=} must divide {k=}"
    else:
        if jnp.dtype(out_dtype) != jnp.dtype(jnp.bfloat16):
            return f"the prefill kernel ({m=} > {SMALL_M_MAX}) writes bfloat16 only, not {jnp.dtype(out_dtype).name}"
        if n % (2 * config.tile_n):
            return f"2 * {config.tile_n=} must divide {n=}"
        if k % config.tile_k:
            return f"{config.tile_k=} must divide {k=}"
    return None


def supports(m: int, k: int, n: int, dtype, out_dtype=None) -> bool:
    """Whether [M, K] @ [K, N] in ``dtype`` -> ``out_dtype`` (None = dtype) fits this kernel with its
    default config (the model's ``matmul_backend`` dispatch falls back to XLA otherwise)."""
    return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and min(m, k, n) > 0
            and _shape_error(m, k, n, default_config(m, k, n, dtype), out_dtype or dtype) is None)


def _check_args(a, w, config: MatmulConfig, out_dtype):
    if a.ndim != 2 or w.ndim != 2:
        raise ValueError(f"a must be [M, K] and w [K, N], got {a.shape=} {w.shape=}")
    m, k = a.shape
    k2, n = w.shape
    if k != k2:
        raise ValueError(f"contraction mismatch: {a.shape=} vs {w.shape=}")
    if a.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"a and w must be bfloat16, got {a.dtype=} {w.dtype=}")
    error = _shape_error(m, k, n, config, out_dtype)
    if error is not None:
        raise ValueError(error)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def matmul(a, w, config: MatmulConfig | None = None, out_dtype=None):
    """a [M, K] bf16 @ w [K, N] bf16 -> [M, N] in out_dtype (f32 accumulation). out_dtype: None =
    bfloat16; float32 (the unrounded sums, e.g. to add a bias before rounding) only for M <= SMALL_M_MAX."""
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if config is None:
        config = default_config(a.shape[0], a.shape[1], w.shape[-1], a.dtype)
    _check_args(a, w, config, out_dtype)
    if a.shape[0] <= SMALL_M_MAX:
        return _matmul_small_m(a, w, config, out_dtype)
    return _matmul_large_m(a, w, config)


def matmul_reference(a, w):
    """Float32 reference: (a @ w) in f32."""
    return jnp.dot(a.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
