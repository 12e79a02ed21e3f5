"""bf16 x bf16 -> bf16 Tensor-Core matmul for Hopper (Mosaic GPU, wgmma + TMA), f32 accumulation.

Owns: ``matmul(a [M, K], w [K, N]) -> [M, N]`` for the projection shapes of the model, its two
kernels, a float32 reference and the tuning config. It does not own quantized weights
(``quantized_matmul``) nor choosing between this and XLA (the model's dispatch does).

Two kernels, picked by M:
  * small M (decode, M <= ``SMALL_M_MAX``): memory-bound on the weights. Computed as
    ``out^T [N, M] = w^T [N, K] @ a^T [K, M]`` so the large N fills the wgmma M side and the few
    tokens are the wgmma N side (padded to a multiple of 8). Warp-specialized: one memory
    warpgroup TMA-streams the weight tiles ``num_stages`` deep, two compute warpgroups each own
    tile_n / 2 output channels. Grid (N / tile_n, num_k_splits): split-K (uneven splits allowed:
    the last split skips the steps past K) spreads the weights over every SM (one CTA per SM: the
    warp-specialized pipeline gives the compute warpgroups the register file, 168 registers a thread at
    launch); partial sums (f32) are added and transposed in XLA (``small_m_result``: with split-K in a fusion
    of their own, not inside each consumer). The same kernel takes
    int8 / fp8 weights [N, K] for ``quantized_matmul``, dequantized in registers (4 bytes a thread,
    converted to f16 and used in place as the wgmma operand against f16 tokens in the matching K order: ``_narrow_operand``;
    in K chunks of ``NARROW_CHUNK_K``, one chunk converted while the previous one's wgmma runs), and group-scaled int4
    codes [G, N, g] for ``int4_matmul``: each group's dot goes to a fresh wgmma accumulator that is
    added to a register accumulator scaled per output channel. With 8-bit tokens of the weights' type
    (``w8a8_matmul``: fp8 e4m3 x e4m3 with f32 accumulation, or int8 x int8 with int32 accumulation)
    both wgmma operands come straight from SMEM, K-major, with no conversion.
  * large M (prefill): compute-bound. A persistent, warp-specialized kernel: one memory
    warpgroup streams (tile_m x tile_k, tile_k x 2*tile_n) tiles ``num_stages`` deep, two compute
    warpgroups each own a tile_m x tile_n accumulator; bf16 epilogue through SMEM and TMA. Where the
    output has few tiles for the SMs and K is long (M=256 of GLM-4's down projection: 2 x 16 tiles for
    132 SMs), split-K: the CTAs loop over (split, tile) work items, each summing one K range (uneven
    splits as the small-M kernel's), and write f32 partial sums [S, Mp, N] that XLA adds and rounds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _narrow_operand as narrow_operand
from pallas_kernels import tuning
from pallas_kernels._interpret import interpreting
from pallas_kernels._smem import smem_transforms

SMALL_M_MAX = 128
# Compute warpgroups of the small-M kernel. Four (with 256-channel tiles) ran in the GPU interpreter but
# hung on an H100 (2026-11-26: a 60 s probe never returned), so the kernel has no such option.
SMALL_M_COMPUTE_WGS = 2
SMEM_BUDGET = 220 * 1024  # bytes; Hopper allows 227 KiB of dynamic SMEM per CTA
HALF_SM_SMEM_BUDGET = 228 * 1024 // 2 - 1024 - 256  # half an SM's 228 KiB, less the per-CTA reserve and barriers
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))  # float32: small-M kernel only
_SMALL_M_ALIGN = 8  # wgmma N (the token side) comes in multiples of 8
# Narrow (int8 / fp8) weights are converted and fed to wgmma in K chunks of this many (one 128-byte swizzle row),
# so one chunk's conversion overlaps the previous chunk's wgmma (ncu, H200, gate_up at M = 8, tile_k 256, weights
# then loaded 2 bytes a thread: int8 38.9 -> 38.4 µs, fp8 35.9 -> 34.9 µs against the whole tile_k at once).
NARROW_CHUNK_K = 128
_GROUP_DOT_REGS = 96  # group-scaled weights: registers per thread for the group wgmmas in flight (a guess, untuned)
# Large-M kernel: SMEM per CTA up to Hopper's 227 KiB less 1 KiB for the pipeline's barriers (its default
# 128 x 256 tiles, tile_k 64, 4 stages take 224 KiB and run on an H100).
LARGE_M_SMEM_BUDGET = 227 * 1024 - 1024
_EPILOGUE_ROWS, _EPILOGUE_ROW_BYTES = 64, 128  # large-M epilogue piece: 64 x 64 bf16, or 64 x 32 f32 partial sums
# Split-K partial sums are added in an XLA fusion of their own (``small_m_result``). Left to XLA, the sum is fused
# into each consumer: into an RMSNorm's reduction over N (GLM-4-0414's post-attention norm of o_proj's output at
# one token: the whole [S, N, 8] f32 read by that reduction's single thread block, 5.6 µs a layer, H200 trace of
# session 21), and into each of several consumers (qkv's: K cache write, V cache write, q rotary), each adding
# the S partials again.
SPLIT_SUMS_APART = True
_FLOPS_PER_HBM_BYTE = 295  # H100 SXM: 989 dense bf16 TFLOP/s / 3.35 TB/s (the large-M split-K heuristic's cost unit)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes. Small-M kernel: tile_n (split over two compute warpgroups of >= 64 rows each),
    tile_k, num_stages, num_k_splits.
    Large-M kernel: tile_m x tile_n per compute warpgroup (CTA tile tile_m x 2*tile_n), tile_k,
    num_stages, num_k_splits (> 1: f32 partial sums); epilogue in pieces of 64 rows x 128 bytes."""

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


def shape_key(m: int, k: int, n: int) -> str:
    """Tuning-table key of an (M, K, N) matmul: small M by the padded token count the kernel computes
    (M = 1..8 share one entry), large M exactly."""
    return f"M{small_m_m_pad(m) if m <= SMALL_M_MAX else m}_K{k}_N{n}"


def beats_xla(m: int, k: int, n: int, dtype) -> bool:
    """Whether this card's tuning-table entry for (M, K, N) was measured faster than XLA's dot."""
    return tuning.beats_xla("matmul", dtype, shape_key(m, k, n))


def beats_xla_at(k: int, n: int, dtype) -> bool:
    """Whether any M of a [K, N] weight has an entry on this card measured faster than XLA's dot."""
    return any(key.endswith(f"_K{k}_N{n}") for key in tuning.shape_keys_beating_xla("matmul", dtype))


def default_config(m: int, k: int, n: int, dtype) -> MatmulConfig:
    """Tuned config for (M, K, N) on the current card, else a heuristic (never fails)."""
    tuned = tuning.lookup("matmul", dtype, shape_key(m, k, n))
    if tuned is not None:
        return MatmulConfig(**tuned)
    if m <= SMALL_M_MAX:
        return MatmulConfig(**small_m_heuristic(m, k, n, weight_itemsize=2))
    return MatmulConfig(**large_m_heuristic(m, k, n))


def _k_split(total_steps: int, splits: int, split):
    """Split-K arithmetic of both kernels: each of ``splits`` K ranges runs ``steps = ceil(total_steps /
    splits)`` pipeline steps from K block ``split * steps``; the last range may have fewer real steps.
    Returns (steps, block(kk): the K block of step kk, clamped to the last block so no load leaves K,
    real(kk): whether step kk is inside K - a clamped step must skip its dot)."""
    steps = pl.cdiv(total_steps, splits)
    first, last_block = split * steps, total_steps - 1
    return steps, lambda kk: jnp.minimum(first + kk, last_block), lambda kk: first + kk <= last_block


def _small_m_kernel(a_ref, w_ref, *refs, config, weights_nk: bool, narrow: bool, dequant_via_smem: bool,
                    group_size: int = 0):
    # a_ref [Mp, K] bf16 (f16 with int8 | fp8 weights, ``narrow``: _narrow_operand), or int8 | fp8 with w_ref of the same type
    # (8-bit x 8-bit); w_ref [K, N] bf16, or
    # [N, K] (weights_nk) bf16 | int8 | fp8, or with group_size g > 0 (group-scaled) [G, N, g] int4 codes
    # followed by scale_ref [G, N] f32 (G = K / g); out_ref [S, N, Mp] partial sums of out^T in the
    # accumulator type (f32; int32 for int8 x int8). scratch: out_smem [W, tile_n/W, Mp] of that type (W compute
    # warpgroups), and with dequant_via_smem a [W, tile_n/W, tile_k or g] tile of the dequantized weights (bf16; f16 8-bit).
    scale_ref, (out_ref, out_smem, *deq_smem) = (refs[0], refs[1:]) if group_size else (None, refs)
    tile_n, tile_k, splits = config.tile_n, config.tile_k, config.num_k_splits
    wgs = SMALL_M_COMPUTE_WGS
    rows = tile_n // wgs  # output channels per compute warpgroup
    m_pad, k = a_ref.shape
    n_idx, split = lax.axis_index("n"), lax.axis_index("split")
    steps, k_block, real_step = _k_split(k // tile_k, splits, split)

    def weight_operand(w_smem, wg, ks=slice(None)):
        """This warpgroup's [rows, tile_k] (group-scaled: [rows, g]) wgmma A operand of the tokens' type (bf16; narrow
        weights: f16, ``_narrow_operand``); ``ks``: a K chunk of it (narrow weights only)."""
        if not weights_nk:  # [tile_k, tile_n] bf16: a transposed SMEM view
            return w_smem.at[:, pl.ds(wg * rows, rows)].T
        if w_smem.dtype == a_ref.dtype:  # bf16 x bf16, or 8-bit x 8-bit: K-major straight from SMEM
            return w_smem.at[pl.ds(wg * rows, rows)]
        tile = w_smem.at[pl.ds(wg * rows, rows), ks]  # narrow, SMEM -> registers, dequantized there
        if narrow and not dequant_via_smem:  # 4 bytes a thread, converted in place; K order: swap_k_bits
            return narrow_operand.upcast_operand(plgpu.load(tile, layout=narrow_operand.LOAD_LAYOUT))
        w = tile[...]
        if narrow:  # the interpreter: the register path's operand (f16, K in its order)
            w = narrow_operand.swap_k_bits(w.astype(narrow_operand.OPERAND_DTYPE))
        else:  # group-scaled int4 codes
            w = w.astype(jnp.bfloat16)
        if dequant_via_smem:  # the GPU interpreter runs wgmma only on SMEM operands
            deq_smem[0][wg, :, ks] = w
            plgpu.commit_smem()
            return deq_smem[0].at[wg, :, ks]
        return w

    chunk = min(tile_k, NARROW_CHUNK_K) if narrow else tile_k

    def step(indices, a_smem, w_smem, acc_ref):  # a_smem [Mp, tile_k] of the tokens' type
        @pl.when(real_step(indices[0]))  # past K (uneven split): the clamped block is skipped
        def _():
            # Narrow weights in K chunks: chunk c + 1 is loaded and converted while chunk c's wgmma runs.
            for c in range(tile_k // chunk):
                ks = pl.ds(c * chunk, chunk) if chunk < tile_k else slice(None)
                plgpu.wgmma(acc_ref, weight_operand(w_smem, lax.axis_index("wg"), ks), a_smem.at[:, ks].T)
                if c:
                    plgpu.wgmma_wait(1)  # chunk c - 1's registers are free
            plgpu.wgmma_wait(0)  # the memory warpgroup refills this stage's slots next

        return acc_ref

    def group_step(indices, a_smem, w_smem, s_smem, acc):  # w_smem [tile_k/g, tile_n, g], s_smem [tile_k/g, tile_n]
        wg = lax.axis_index("wg")

        def group_dots(first_group, *dot_refs):  # each group's dot in a fresh accumulator: issued back to back
            for j, dot_ref in enumerate(dot_refs, first_group):
                plgpu.wgmma(dot_ref, weight_operand(w_smem.at[j], wg), a_smem.at[:, pl.ds(j * group_size, group_size)].T)
            return [dot_ref[...] for dot_ref in dot_refs]  # awaited together

        def accumulate(acc):  # acc [rows, Mp] f32 in registers
            groups = tile_k // group_size
            # bf16 operand + f32 accumulator registers per thread of one group's wgmma; a few in flight at once
            per_group = rows * (2 * group_size + 4 * m_pad) // (4 * 128)
            in_flight = max(1, min(groups, _GROUP_DOT_REGS // per_group))
            for start in range(0, groups, in_flight):
                count = min(in_flight, groups - start)
                dots = pl.run_scoped(functools.partial(group_dots, start), *[plgpu.ACC((rows, m_pad), jnp.float32)] * count)
                for j, dot in enumerate(dots, start):  # scaled per output channel (row)
                    scale = s_smem[j, pl.ds(wg * rows, rows)]  # [rows]
                    acc = acc + dot * lax.broadcast_in_dim(scale, (rows, m_pad), (0,))
            return acc

        return lax.cond(real_step(indices[0]), accumulate, lambda acc: acc, acc)

    def store(acc):  # acc [rows, Mp] f32 -> this warpgroup's rows of out_ref[split]
        wg = lax.axis_index("wg")
        out_smem[wg] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[split, pl.ds(n_idx * tile_n + wg * rows, rows)])
        plgpu.wait_smem_to_gmem(0)

    def compute_context(run_pipeline):
        if group_size:  # the accumulator stays in registers: each group's dot is rescaled before it is added
            store(run_pipeline(jnp.zeros((rows, m_pad), jnp.float32)))
            return

        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((rows, m_pad), out_ref.dtype))
        def acc_scope(acc_ref):
            run_pipeline(acc_ref)
            store(acc_ref[...])

    w_block, w_index, w_minor = ((tile_n, tile_k), lambda kk: (n_idx, k_block(kk)), tile_k) if weights_nk else \
        ((tile_k, tile_n), lambda kk: (k_block(kk), n_idx), tile_n)
    extra_specs, inputs = [], (a_ref, w_ref)
    if group_size:  # a step reads tile_k / g whole groups of codes and their scales
        groups = tile_k // group_size
        w_block, w_index, w_minor = (groups, tile_n, group_size), lambda kk: (k_block(kk), n_idx, 0), group_size
        extra_specs = [plgpu.BlockSpec((groups, tile_n), lambda kk: (k_block(kk), n_idx), memory_space=plgpu.SMEM)]
        inputs = (a_ref, w_ref, scale_ref)
    plgpu.emit_pipeline_warp_specialized(
        group_step if group_size else step,
        grid=(steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((m_pad, tile_k), lambda kk: (0, k_block(kk)),
                            transforms=smem_transforms(tile_k, a_ref.dtype), memory_space=plgpu.SMEM),
            plgpu.BlockSpec(w_block, w_index, transforms=smem_transforms(w_minor, w_ref.dtype), memory_space=plgpu.SMEM),
            *extra_specs,
        ],
        wg_axis="wg",
        num_compute_wgs=wgs,
        max_concurrent_steps=config.num_stages,
        compute_context=compute_context,
    )(*inputs)


def small_m_heuristic(m: int, k: int, n: int, weight_itemsize: float, tile_ks: tuple[int, ...] | None = None,
                      activation_itemsize: int = 2) -> dict:
    """Untuned small-M tiles: 128 output channels per CTA (64 per compute warpgroup), 32 KiB weight
    steps (tile_k 128 for bf16, 256 for one-byte weights, where K allows), and the deepest pipeline
    (2-4 stages) within half an SM's SMEM - measured faster on an H100 than a deeper pipeline
    (benchmarks/tune_matmul.py; not from a second CTA on the SM: ncu on an H200 shows the registers, 168 a
    thread, allow one); split-K by ``tuning.split_k``'s memory-bound model (enough
    CTAs to reach the HBM bandwidth, no more: each split adds f32 partial sums and their XLA sum).
    ``weight_itemsize``: bytes per weight, fractional for 4-bit codes (with their group scales);
    ``tile_ks``: the tile_k candidates, widest first (default: the 32 KiB step, 128, 64);
    ``activation_itemsize``: bytes per token element (1 for 8-bit tokens)."""
    tile_n = 128
    tile_ks = tile_ks or (int(32 * 1024 // (tile_n * weight_itemsize)), 128, 64)
    tile_k = next((t for t in tile_ks if k % t == 0), tile_ks[-1])
    m_pad = small_m_m_pad(m)
    fields = {}
    for stages in (4, 3, 2):
        fields = dict(tile_n=tile_n, tile_k=tile_k, num_stages=stages, num_k_splits=1)
        if small_m_smem_bytes(MatmulConfig(**fields), m, weight_itemsize, activation_itemsize) <= HALF_SM_SMEM_BUDGET:
            break
    fields["num_k_splits"] = tuning.split_k(pl.cdiv(n, tile_n), k // tile_k, step_bytes=tile_n * tile_k * weight_itemsize,
                                            partial_bytes_per_split=n * m_pad * 4, memory_bound=True)
    return fields


def small_m_m_pad(m: int) -> int:
    """Token rows the small-M kernel computes for M tokens (the wgmma N side, a multiple of 8)."""
    return pl.cdiv(m, _SMALL_M_ALIGN) * _SMALL_M_ALIGN


def small_m_smem_bytes(config, m: int, weight_itemsize: float, activation_itemsize: int = 2) -> int:
    """SMEM one CTA of the small-M kernel needs on the GPU: the pipelined token and weight tiles and the
    f32 / int32 output tile (narrow weights are dequantized in registers; only the interpreter adds an f16 / bf16 tile)."""
    m_pad = small_m_m_pad(m)
    stages = config.num_stages * (m_pad * config.tile_k * activation_itemsize + config.tile_n * config.tile_k * weight_itemsize)
    return stages + config.tile_n * m_pad * 4


def small_m_shape_error(m: int, k: int, n: int, config, weight_itemsize: float, activation_itemsize: int = 2) -> str | None:
    """Why the small-M kernel cannot run (M, K, N) with ``config`` (tiles, SMEM), or None when it can."""
    if config.tile_n % (64 * SMALL_M_COMPUTE_WGS):
        return f"{config.tile_n=} must be a multiple of 128 (two compute warpgroups of >= 64-row wgmmas)"
    smem = small_m_smem_bytes(config, m, weight_itemsize, activation_itemsize)
    if smem > SMEM_BUDGET:
        return f"{config=} needs {smem} bytes of SMEM > {SMEM_BUDGET} at {m=}"
    if n % config.tile_n:
        return f"{config.tile_n=} must divide {n=}"
    if k % config.tile_k:
        return f"{config.tile_k=} must divide {k=}"
    if config.num_k_splits > k // config.tile_k:
        return f"{config.num_k_splits=} exceeds the {k // config.tile_k} K steps of {config.tile_k=}"
    return None


def small_m_partial_sums(a, w, config, weights_nk: bool = False, group_scales=None):
    """a [M, K] bf16 with w [K, N] bf16 (or [N, K] bf16 | int8 | fp8 when ``weights_nk``) -> [S, N, Mp]
    float32 partial sums of (a @ w)^T over the config's S = num_k_splits K ranges (Mp = small_m_m_pad(M)).
    8-bit x 8-bit: a [M, K] int8 | fp8 with w [N, K] of the same type (``weights_nk``; tile_k a multiple of
    128, one 128-byte swizzled row) -> the partial sums in the accumulator type: float32 for fp8, int32 for int8.
    Group-scaled weights: w [G, N, g] int4 codes with ``group_scales`` [G, N] f32 (G = K / g groups
    of g consecutive K; tile_k a multiple of g) -> the partial sums of sum_g scale_g * (a_g @ w_g^T)^T.
    The kernel behind ``matmul`` (M <= SMALL_M_MAX), ``quantized_matmul`` and ``int4_matmul``; shapes
    checked by them."""
    m, k = a.shape
    group_size = w.shape[2] if group_scales is not None else 0
    n = w.shape[1] if group_size else w.shape[0] if weights_nk else w.shape[1]
    m_pad, wgs = small_m_m_pad(m), SMALL_M_COMPUTE_WGS
    rows = config.tile_n // wgs
    acc_dtype = jnp.int32 if a.dtype == jnp.int8 else jnp.float32
    narrow = not group_size and weights_nk and w.dtype != a.dtype  # 8-bit weights: f16 tokens in the operand's K order
    via_smem = (weights_nk or group_size) and w.dtype != a.dtype and interpreting()
    scratch = [plgpu.SMEM((wgs, rows, m_pad), acc_dtype, transforms=smem_transforms(m_pad, acc_dtype))]
    if via_smem:
        deq_k, deq_dtype = group_size or config.tile_k, narrow_operand.OPERAND_DTYPE if narrow else jnp.bfloat16
        scratch.append(plgpu.SMEM((wgs, rows, deq_k), deq_dtype, transforms=smem_transforms(deq_k, deq_dtype)))
    kernel = plgpu.kernel(
        functools.partial(_small_m_kernel, config=config, weights_nk=weights_nk or bool(group_size), narrow=narrow,
                          dequant_via_smem=via_smem, group_size=group_size),
        out_type=jax.ShapeDtypeStruct((config.num_k_splits, n, m_pad), acc_dtype),
        scratch_types=tuple(scratch),
        grid=(n // config.tile_n, config.num_k_splits),
        grid_names=("n", "split"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    tokens = narrow_operand.operand_tokens(a) if narrow else a
    sums = kernel(jnp.pad(tokens, ((0, m_pad - m), (0, 0))), w, *(() if group_scales is None else (group_scales,)))
    return sums * (1 / narrow_operand.TOKEN_SCALE) if narrow else sums  # exact (a power of two); fused downstream


def small_m_result(partial_sums, m: int, out_dtype, epilogue=None):
    """[S, N, Mp] partial sums of ``small_m_partial_sums`` -> [M, N] in out_dtype: added over S, the M real
    rows kept, transposed, ``epilogue`` ([M, N] sums in the accumulator type -> [M, N] f32: scales, offsets)
    applied, rounded once. With S > 1 (and ``SPLIT_SUMS_APART``) the result is its own XLA fusion (an
    optimization barrier), not fused into its consumers (see ``SPLIT_SUMS_APART``)."""
    out = partial_sums.sum(axis=0)[:, :m].T
    out = (out if epilogue is None else epilogue(out)).astype(out_dtype)
    return lax.optimization_barrier(out) if SPLIT_SUMS_APART and partial_sums.shape[0] > 1 else out


def _matmul_small_m(a, w, config: MatmulConfig, out_dtype):
    return small_m_result(small_m_partial_sums(a, w, config), a.shape[0], out_dtype)


def large_m_smem_bytes(config: MatmulConfig) -> int:
    """SMEM one CTA of the large-M kernel needs: the pipelined bf16 A [tile_m, tile_k] and W [tile_k, 2*tile_n]
    tiles and the epilogue's two slots per compute warpgroup (the same bytes for bf16 and f32 pieces)."""
    stage = (config.tile_m * config.tile_k + config.tile_k * 2 * config.tile_n) * 2
    return config.num_stages * stage + 2 * 2 * _EPILOGUE_ROWS * _EPILOGUE_ROW_BYTES


def large_m_shape_error(m: int, k: int, n: int, config: MatmulConfig) -> str | None:
    """Why the large-M kernel cannot run (M, K, N) with ``config`` (tiles, split-K, SMEM), or None when it can."""
    if n % (2 * config.tile_n):
        return f"2 * {config.tile_n=} must divide {n=} (a CTA tile is tile_m x 2*tile_n)"
    if k % config.tile_k:
        return f"{config.tile_k=} must divide {k=}"
    total_steps, splits = k // config.tile_k, config.num_k_splits
    if splits > total_steps:
        return f"split-K: {config.num_k_splits=} exceeds the {total_steps} K steps of {config.tile_k=} at {k=}"
    steps = pl.cdiv(total_steps, splits)
    if (splits - 1) * steps >= total_steps:
        return (f"split-K: {config.num_k_splits=} splits the {total_steps} K steps of {config.tile_k=} into ranges "
                f"of {steps} steps, leaving the last split none: use fewer splits")
    smem = large_m_smem_bytes(config)
    if smem > LARGE_M_SMEM_BUDGET:
        return f"{config=} needs {smem} bytes of SMEM > {LARGE_M_SMEM_BUDGET} (fewer stages or smaller tiles)"
    return None


def large_m_heuristic(m: int, k: int, n: int) -> dict:
    """Untuned large-M tiles: 128 x 256 CTA tiles (128 x 128 where 256 does not divide N), tile_k 64, 4 stages
    - unchanged where those tiles cover the SMs. Otherwise (few tiles, e.g. M=256 of GLM-4's down projection:
    2 x 16 tiles for 132 SMs) 64-row tiles where they pad M less, and split-K over the idle SMs:
    ``tuning.split_k`` with each K step costed as the HBM bytes its flops take at the card's flop/byte
    balance (``_FLOPS_PER_HBM_BYTE``), the f32 partial sums as their bytes, >= 4 steps a split. Where K is too
    short for the splits to fill half the SMs, 64-row tiles double the work items."""
    tile_n, tile_k = (128 if n % 256 == 0 else 64), 64
    fields = dict(tile_m=128, tile_n=tile_n, tile_k=tile_k, num_stages=4, num_k_splits=1)
    sms = tuning.num_sms()
    tiles = lambda tile_m: pl.cdiv(m, tile_m) * (n // (2 * tile_n))
    if tiles(128) >= sms or k % tile_k or n % (2 * tile_n):  # full waves already, or a shape the kernel rejects
        return fields
    padded = lambda tile_m: pl.cdiv(m, tile_m) * tile_m
    for tile_m in ((64,) if padded(64) < padded(128) else (128, 64)):
        step_flops = 2 * tile_m * 2 * tile_n * tile_k
        splits = tuning.split_k(tiles(tile_m), k // tile_k, step_bytes=step_flops // _FLOPS_PER_HBM_BYTE,
                                partial_bytes_per_split=padded(tile_m) * n * 4)
        fields.update(tile_m=tile_m, num_k_splits=splits)
        if 2 * tiles(tile_m) * splits >= sms:
            break
    return fields


def _large_m_kernel(a_ref, w_ref, out_ref, *, config: MatmulConfig):
    # a_ref [Mp, K] bf16, w_ref [K, N] bf16; out_ref [Mp, N] bf16 (S = num_k_splits = 1), or with split-K
    # [S, Mp, N] f32: split s's partial sums over its K range (summed in XLA). Work items (split, tile).
    tile_m, tile_n, tile_k, splits = config.tile_m, config.tile_n, config.tile_k, config.num_k_splits
    m, k = a_ref.shape
    n = w_ref.shape[1]
    cta_n = 2 * tile_n
    m_iters, n_iters = m // tile_m, n // cta_n
    epi_m, epi_n = _EPILOGUE_ROWS, _EPILOGUE_ROW_BYTES // out_ref.dtype.itemsize  # 64 x 64 bf16 | 64 x 32 f32
    steps = pl.cdiv(k // tile_k, splits)

    def pipeline(body, compute_context, k_block=lambda kk: kk):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tile_m, tile_k), lambda kk: (0, k_block(kk)),
                                transforms=smem_transforms(tile_k, a_ref.dtype), memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_k, cta_n), lambda kk: (k_block(kk), 0),
                                transforms=smem_transforms(cta_n, w_ref.dtype), memory_space=plgpu.SMEM),
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
        out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), out_ref.dtype, transforms=smem_transforms(epi_n, out_ref.dtype)),
        collective_axes="wg",
    )
    def scope(allocations, out_smem):  # out_smem [compute wg, slot, 64, 128 bytes]
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((splits, m_iters * n_iters), collective_axes="cta")
        def tile_loop(info: plgpu.NDLoopInfo):
            split, tile = info.index
            m_idx, n_idx = plgpu.planar_snake(tile, (m_iters, n_iters), 1, 8)
            m_slice = pl.ds(m_idx * tile_m, tile_m)
            n_slice = pl.ds(n_idx * cta_n + wg * tile_n, tile_n)
            out_tile = (out_ref if splits == 1 else out_ref.at[split]).at[m_slice, n_slice]
            _, k_block, real_step = _k_split(k // tile_k, splits, split)

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def acc_scope(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...].astype(out_ref.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for i in range(tile_m // epi_m):
                        for j in range(tile_n // epi_n):
                            slot = (i * (tile_n // epi_n) + j) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = acc[i * epi_m:(i + 1) * epi_m, j * epi_n:(j + 1) * epi_n]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot], out_tile.at[pl.ds(i * epi_m, epi_m), pl.ds(j * epi_n, epi_n)])

            def dot(a_smem, w_smem, acc_ref):  # a_smem [tile_m, tile_k], w_smem [tile_k, 2*tile_n]
                plgpu.wgmma(acc_ref, a_smem, w_smem.at[:, pl.ds(wg * tile_n, tile_n)])
                plgpu.wgmma_wait(0)

            def step(indices, a_smem, w_smem, acc_ref):
                if splits == 1:
                    dot(a_smem, w_smem, acc_ref)
                else:  # past K (uneven split): the clamped block is skipped
                    pl.when(real_step(indices[0]))(lambda: dot(a_smem, w_smem, acc_ref))
                return acc_ref

            pipeline(step, compute_context, k_block if splits > 1 else (lambda kk: kk))(
                a_ref.at[m_slice, :], w_ref.at[:, pl.ds(n_idx * cta_n, cta_n)], allocations=allocations
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _matmul_large_m(a, w, config: MatmulConfig):
    m, k = a.shape
    n = w.shape[1]
    m_pad = pl.cdiv(m, config.tile_m) * config.tile_m
    a_pad = jnp.pad(a, ((0, m_pad - m), (0, 0))) if m_pad != m else a
    splits = config.num_k_splits
    out_type = jax.ShapeDtypeStruct((m_pad, n), a.dtype) if splits == 1 else \
        jax.ShapeDtypeStruct((splits, m_pad, n), jnp.float32)
    kernel = plgpu.kernel(
        functools.partial(_large_m_kernel, config=config),
        out_type=out_type,
        grid=(tuning.num_sms(),),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    out = kernel(a_pad, w)  # [Mp, N] bf16, or [S, Mp, N] f32 partial sums
    return out[:m] if splits == 1 else out[:, :m].sum(axis=0).astype(a.dtype)  # one XLA fusion


def out_dtype_error(m: int, out_dtype) -> str | None:
    """Why the kernels cannot write ``out_dtype`` for M rows (float32 from the small-M kernel only), or None."""
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        return f"out_dtype={jnp.dtype(out_dtype).name} must be one of {[d.name for d in OUT_DTYPES]}"
    if m > SMALL_M_MAX and jnp.dtype(out_dtype) != jnp.dtype(jnp.bfloat16):
        return f"the prefill kernel ({m=} > {SMALL_M_MAX}) writes bfloat16 only, not {jnp.dtype(out_dtype).name}"
    return None


def _shape_error(m: int, k: int, n: int, config: MatmulConfig, out_dtype) -> str | None:
    """Why (M, K, N) with output ``out_dtype`` does not fit ``config``'s tiles, or None when it does."""
    error = out_dtype_error(m, out_dtype)
    if error is not None:
        return error
    if m <= SMALL_M_MAX:
        return small_m_shape_error(m, k, n, config, weight_itemsize=2)
    return large_m_shape_error(m, k, n, config)


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
