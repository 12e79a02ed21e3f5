"""Ragged paged attention for Hopper (Mosaic GPU): prefill chunks and decode tokens in one launch.

Owns: the attention kernel the model's attention dispatch calls, its jitted wrapper (argument
checks, split-K combine), the Q / O tile layout both ragged attention kernels use (``TileLayout``), a
float32 pure-jnp reference and the tuning config.
It does not own writing K/V into the cache (the model does that before calling this) nor building
the metadata (``autoglm_jax.model.attention_metadata``).

Semantics: token ``t`` (of sequence ``seq_ids[t]``) attends to cache positions
``0..positions[t]`` of its sequence, read through ``page_table``; tokens ``t >= num_tokens`` are
padding and produce zeros. Tokens are laid out sequence after sequence (``query_start_loc``).

KV cache dtype: q's (bf16 / f16), or float8 e4m3 (``kv_cache_dtype="fp8"``, scale 1): TMA moves the fp8
pages (half the bytes: decode attention is bound by them) and each computing warpgroup converts a K (then V)
block into a [block_kv, D] float16 tile in SMEM (``kv_operand``; ``NARROW_COMPUTE``) before its wgmma, the
narrow slot released as soon as it is converted; both wgmmas then run in float16 (Q converted once per CTA,
saturated to f16's range, ``q_operand``; P rounded to f16), accumulating in f32 as always.

Kernel layout. GQA groups share the rows of one tile so that each K/V page is read once per KV head,
not once per query head: for KV head ``h`` (query heads ``h*G .. h*G + G - 1``) the 64 tile rows (one
wgmma M) hold ``block_q`` consecutive flat tokens x ``G`` heads, ``R = 64 // block_q`` rows per token.
``block_q`` defaults to ``64 // G_pad`` (``G`` padded to a power of two: the densest packing, for prefill
chunks) and to 1 for decode-only steps (one token per sequence), so that a CTA streams one sequence's K/V
in one uninterrupted pipeline. TMA copies move the rows straight between q / out [Tp, Nq, D] and the SMEM
tile (``TileLayout``; SMEM row slices must be whole 8-row tiles, which fixes the row order):
  * token-major, rows (token, head), when ``G % 8 == 0`` (GLM-4: G 16): one [G, D] copy per token,
    ``q[t, h*G : h*G + G]``, into rows ``i*R ..`` (decode, block_q 1: one copy, rows G.. unused);
  * head-major, rows (head, token), when ``G_pad <= 8`` and ``block_q % 8 == 0`` (Llama family, mixed
    steps): one strided [block_q, D] copy per head, ``q[t0 : t0 + block_q, h*G + g]``, into rows ``g*block_q ..``;
  * otherwise (G > 8 not a multiple of 8, or G % 8 != 0 with block_q < 8, e.g. Llama decode) XLA packs q
    into [Nkv, Tp * R, D] (each token's group zero-padded to R rows) and unpacks the output.
Rows no copy fills (pad heads, R > G) hold whatever SMEM held and are never stored; softmax is per row,
so nothing of them reaches other rows. Rows of padding tokens (>= num_tokens) are zeroed before the
output copies; q is padded only when T is not a multiple of block_q.
One CTA owns one (token block, KV head, KV split). With ``consumer_warpgroups == 0`` (always for mixed
steps) one warpgroup both issues the TMA copies and computes, as described next. Because the tokens of a block may belong to several sequences
(a block of decode tokens holds ``block_q`` sequences), the CTA loops over the sequences that
intersect its block; for each it copies the sequence's page-table row into SMEM (one bulk copy; the
page ids of every TMA then come from SMEM, not from dependent global loads), streams that sequence's
K/V blocks (``block_kv`` rows gathered from ``block_kv // page_size`` pages by TMA, ``num_stages``
deep) and masks rows of other sequences. Split-K (``num_kv_splits > 1``) cuts each sequence's KV range into slices handled by
different CTAs; their partial outputs and log-sum-exps ([S, Nkv, Tp * R(, D)] f32, tile rows) are combined
in XLA into [T, Nq, D] (the rows taken to token order inside the combine's fusions). That serves long
decode contexts with few sequences without a second kernel. The softmax probabilities P are the
PV wgmma's register A operand on the GPU; the GPU interpreter cannot run a register A operand, so
there P goes through an SMEM tile.

Warp-specialized decode (``consumer_warpgroups`` 1 or 2, needs ``block_q = 1``; ``default_config(...,
decode=True)`` picks it): one token per CTA, so the CTA's rows see keys ``0..positions[t]`` of one
sequence and only the last KV block needs a mask. A TMA producer warpgroup copies Q and the sequence's
page-table row into SMEM, then streams the split's K/V blocks into a ring of ``num_stages`` slots
("full" barriers TMA -> consumer, "consumed" barriers consumer -> TMA; K is released right after QK^T),
so a copy waits only for its slot, never for the current block's softmax + PV. With two consumer
warpgroups, consumer c takes KV steps c, c + 2, ... (the slots = c mod 2: ``num_stages`` even, each
slot's barrier phases all waited on by one warpgroup) with its own softmax state; consumer 1 hands
(acc, m, l) to consumer 0 through an f32 SMEM tile and a barrier, which merges, normalizes and stores.
Split-K partials leave through the same epilogue as in the one-warpgroup kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tuning
from pallas_kernels._interpret import interpreting
from pallas_kernels._smem import smem_transforms

ROWS = 64  # query rows per CTA: block_q tokens x G_pad heads = one wgmma M
_MASK_VALUE = -1e30  # finite, so a row that sees only masked keys never produces NaN
_LOG2E = math.log2(math.e)
SMEM_BUDGET = 220 * 1024  # bytes; Hopper allows 227 KiB of dynamic SMEM per CTA
_CONSUMER_REGISTERS, _PRODUCER_REGISTERS = 232, 40  # per thread with two consumers, as JAX's FA3 kernel sets them


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tuning knobs. ``block_kv`` KV rows per pipeline step (a multiple of 64 and of page_size);
    ``num_stages`` TMA buffers in flight; ``num_kv_splits`` CTAs sharing one sequence's KV range;
    ``block_q`` flat tokens per CTA (a power of two, at most 64 // G_pad; None = 64 // G_pad);
    ``consumer_warpgroups`` 0: one warpgroup issues the TMA copies and computes; 1 or 2: the
    warp-specialized one-token-per-CTA kernel (needs ``block_q=1``) with a TMA producer warpgroup and
    this many consumer warpgroups taking alternate KV blocks (``num_stages`` a multiple of it)."""

    block_kv: int = 64
    num_stages: int = 2
    num_kv_splits: int = 1
    block_q: int | None = None
    consumer_warpgroups: int = 0

    def __post_init__(self):
        if self.block_q is not None and (self.block_q < 1 or self.block_q & (self.block_q - 1) or self.block_q > ROWS):
            raise ValueError(f"{self.block_q=} must be None or a power of two in [1, {ROWS}]")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"{self.block_kv=} must be 64, 128, 192 or 256")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be >= 1")
        if self.num_kv_splits < 1:
            raise ValueError(f"{self.num_kv_splits=} must be >= 1")
        if self.consumer_warpgroups not in (0, 1, 2):
            raise ValueError(f"{self.consumer_warpgroups=} must be 0, 1 or 2")
        if self.consumer_warpgroups and self.block_q != 1:
            raise ValueError(f"{self.consumer_warpgroups=} (the warp-specialized decode kernel) needs block_q=1, "
                             f"got {self.block_q=}")
        if self.consumer_warpgroups and self.num_stages % self.consumer_warpgroups:
            raise ValueError(f"{self.num_stages=} must be a multiple of {self.consumer_warpgroups=} (each consumer "
                             "owns every consumer_warpgroups-th slot of the TMA ring)")


def smem_bytes(config: AttentionConfig, head_dim: int, itemsize: int = 2, p_via_smem: bool | None = None,
               max_pages: int = 0, kv_itemsize: int | None = None) -> int:
    """SMEM one CTA needs: Q tile, K/V stages (``kv_itemsize`` bytes an element, None = ``itemsize``), the
    converted K/V tile of each computing warpgroup (narrow caches only), the P tile of each computing
    warpgroup (interpreter only, None = as traced now), the f32 split-K output tile, the f32 merge tile of
    two consumer warpgroups and one page-table row of ``max_pages`` entries."""
    p_via_smem = interpreting() if p_via_smem is None else p_via_smem
    kv_itemsize = itemsize if kv_itemsize is None else kv_itemsize
    kv = 2 * config.num_stages * config.block_kv * head_dim * kv_itemsize
    if kv_itemsize != itemsize:
        kv += max(1, config.consumer_warpgroups) * converted_tiles_bytes(config.block_kv, head_dim)
    split_out = (ROWS * head_dim + ROWS) * 4 if config.num_kv_splits > 1 else 0
    merge = (ROWS * head_dim + 2 * ROWS) * 4 if config.consumer_warpgroups > 1 else 0
    p_tile = max(1, config.consumer_warpgroups) * ROWS * config.block_kv * itemsize if p_via_smem else 0
    return ROWS * head_dim * itemsize + kv + p_tile + split_out + merge + 4 * math.prod(page_table_tile(max_pages))


def page_table_tile(max_pages: int) -> tuple[int, int]:
    """(rows, cols) of the SMEM copy of one page-table row: at most 256 entries per dimension (the async
    copy's limit), columns a multiple of 4 (16 bytes); the row is zero-padded to rows * cols."""
    cols = min(256, -(-max(max_pages, 1) // 4) * 4)
    return -(-max_pages // cols), cols


def page_table_width_error(max_pages: int) -> str | None:
    """Why a page table this wide cannot be copied into SMEM (more than 256 x 256 entries), or None."""
    if page_table_tile(max_pages)[0] > 256:
        return f"page_table has {max_pages} columns; at most 65536 pages per sequence"
    return None


def kernel_metadata(layer, num_tokens, seq_ids, positions, query_start_loc, page_table, padded_tokens: int):
    """The int32 metadata operands both attention kernels take, in their order: layer [1], num_tokens [1],
    seq_ids and positions zero-padded to [padded_tokens], query_start_loc [B + 1], and the page table
    zero-padded and reshaped to [B, rows, cols] (``page_table_tile``) for its per-sequence SMEM copy."""
    pad_tokens = lambda x: jnp.pad(x.astype(jnp.int32), (0, padded_tokens - x.shape[0]))
    max_pages = page_table.shape[1]
    rows, cols = page_table_tile(max_pages)
    tiles = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, rows * cols - max_pages))).reshape(-1, rows, cols)
    return (jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.reshape(num_tokens, (1,)).astype(jnp.int32),
            pad_tokens(seq_ids), pad_tokens(positions), query_start_loc.astype(jnp.int32), tiles)


def _padded_group(num_q_heads: int, num_kv_heads: int) -> int:
    group = num_q_heads // num_kv_heads
    return 1 << (group - 1).bit_length()


def head_major(num_q_heads: int, num_kv_heads: int, block_q: int | None = None) -> bool | None:
    """Row order of a 64-row Q tile of ``block_q`` tokens (None = 64 // G_pad) read straight from q
    (module docstring): False token-major (G % 8 == 0), True head-major (G_pad <= 8 and block_q a multiple
    of 8), None when neither fits whole 8-row SMEM tiles (then q is packed by XLA)."""
    group, group_pad = num_q_heads // num_kv_heads, _padded_group(num_q_heads, num_kv_heads)
    block_q = ROWS // group_pad if block_q is None else block_q
    if group % 8 == 0:
        return False
    return True if group_pad <= 8 and block_q % 8 == 0 else None


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where the rows of a 64-row Q / O tile of ``block_q`` tokens x ``group`` query heads (one KV head) live
    in GMEM (module docstring, "Kernel layout"). ``head_major`` as ``head_major()`` returns it: False / True
    for q and out [Tp, Nq, D] read and written in place, None for the packed operand [Nkv, Tp * R, D]."""

    block_q: int
    group: int
    head_major: bool | None

    @property
    def rows_per_token(self) -> int:  # R: token i's rows start at i * R (token-major and packed)
        return ROWS // self.block_q

    @property
    def num_copies(self) -> int:  # TMA copies per tile (arrivals on its barrier)
        return self.group if self.head_major else 1 if self.head_major is None else self.block_q

    def copies(self, ref, tok0, kv_head):
        """(GMEM slice of ref, rows of the tile) of each TMA copy between the tile of tokens tok0 ..
        tok0 + block_q - 1 and ref ([Tp, Nq, D], or [Nkv, Tp * R, D] when packed)."""
        head0 = kv_head * self.group
        if self.head_major is None:
            return [(ref.at[kv_head, pl.ds(tok0 * self.rows_per_token, ROWS)], slice(None))]
        if self.head_major:  # rows (head, token): one strided [block_q, D] copy per head
            return [(ref.at[pl.ds(tok0, self.block_q), head0 + g], pl.ds(g * self.block_q, self.block_q))
                    for g in range(self.group)]
        return [(ref.at[tok0 + t, pl.ds(head0, self.group)], pl.ds(t * self.rows_per_token, self.group))
                for t in range(self.block_q)]  # rows (token, head): one [G, D] copy per token

    def row_tokens(self, cols: int):
        """[64, cols] int32 (WGMMA layout): the tile's token (0 .. block_q - 1) of each row; rows no copy
        fills (pad heads, R > G) map to some token and hold garbage that stays in its row."""
        rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, cols), 0, layout=plgpu.Layout.WGMMA)
        return lax.rem(rows, self.block_q) if self.head_major else lax.div(rows, self.rows_per_token)


def tile_layout(num_q_heads: int, num_kv_heads: int, block_q: int) -> TileLayout:
    return TileLayout(block_q, num_q_heads // num_kv_heads, head_major(num_q_heads, num_kv_heads, block_q))


def default_config(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   page_size: int, max_context: int, dtype, decode: bool = False, cache_dtype=None) -> AttentionConfig:
    """Tuned config for this shape on the current card, else a heuristic (never fails). ``decode``: every
    token is its own sequence's (a decode step): one token per CTA. ``cache_dtype``: the K/V pages' dtype
    (None = ``dtype``); a narrow cache looks up its own tuned entries (suffix ``_kv<dtype>``)."""
    key = f"T{num_tokens}_Nq{num_q_heads}_Nkv{num_kv_heads}_D{head_dim}_ps{page_size}_ctx{max_context}"
    kv_itemsize = jnp.dtype(cache_dtype or dtype).itemsize
    tuned = tuning.lookup("ragged_paged_attention", dtype,
                          key + ("_decode" if decode else "") + cache_key_suffix(dtype, cache_dtype))
    if tuned is not None:
        return AttentionConfig(**tuned)
    fits = lambda config: smem_bytes(config, head_dim, max_pages=max_context // page_size,
                                     kv_itemsize=kv_itemsize) <= SMEM_BUDGET
    block_kv = max(64, page_size) if max(64, page_size) % page_size == 0 else page_size
    block_kv = 128 if block_kv == 64 and max_context >= 1024 and head_dim <= 128 else block_kv
    block_q = 1 if decode else ROWS // _padded_group(num_q_heads, num_kv_heads)
    num_ctas = pl.cdiv(num_tokens, block_q) * num_kv_heads
    if decode:
        # H100, GLM-4 heads (benchmarks/kernels.py, RESULTS "Decode attention, one token per CTA"): split
        # only up to one wave of CTAs (batch 64 x 4k: no split, 0.78 of the copy bandwidth; 3 splits
        # 0.71), down to one KV block per split for a single sequence. One warpgroup: two stages of 128
        # rows beat three (0.82). Warp-specialized (TMA producer + one consumer), the deepest ring that fits
        # (benchmarks/attention_ab.py, RESULTS "Session 6"): as fast as the best config at 64 x 4k (0.93 of
        # the copy bandwidth with the wrapper), 12% less kernel time than one warpgroup at 32 x 4k.
        # An fp8 cache: the consumers' conversions, not the bytes, bound the kernel; two consumers on 64-row
        # blocks overlap them best (H100, RESULTS "Session 14": 0.68 of the copy bandwidth at 64 x 4k).
        shapes = ((2, 64, 4),) if is_narrow(dtype, cache_dtype) and 64 % page_size == 0 else ()
        shapes += tuple((consumers, block_kv, stages) for consumers, stages in ((1, 3), (1, 2), (0, 2), (0, 1)))
        for consumers, kv_rows, stages in shapes:
            splits = max(1, min(tuning.num_sms() // num_ctas, pl.cdiv(max_context, kv_rows)))
            config = AttentionConfig(block_kv=kv_rows, num_stages=stages, num_kv_splits=splits, block_q=1,
                                     consumer_warpgroups=consumers)
            if fits(config):
                return config
    # Enough CTAs to fill the card twice, but keep >= 4 KV blocks per split.
    splits = max(1, min(pl.cdiv(2 * tuning.num_sms(), num_ctas), max_context // (4 * block_kv)))
    for stages in (3, 2, 1):  # deepest pipeline that fits in SMEM
        config = AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits, block_q=block_q)
        if fits(config):
            return config
    return AttentionConfig(block_kv=64, num_stages=1, num_kv_splits=splits, block_q=block_q)


def tokens_per_cta(config: AttentionConfig, num_q_heads: int, num_kv_heads: int) -> int:
    """The config's block_q, resolved (None = the densest packing, 64 // G_pad)."""
    return config.block_q or ROWS // _padded_group(num_q_heads, num_kv_heads)


# KV cache dtypes the kernels read besides q's own: float8 e4m3 pages (``kv_cache_dtype="fp8"``), converted in
# SMEM before each wgmma (``kv_operand``).
NARROW_CACHE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),)


def is_narrow(dtype, cache_dtype) -> bool:
    """Whether a cache of ``cache_dtype`` (None = ``dtype``) is narrower than queries of ``dtype``."""
    return cache_dtype is not None and jnp.dtype(cache_dtype).itemsize < jnp.dtype(dtype).itemsize


def cache_key_suffix(dtype, cache_dtype) -> str:
    """Tuning-table key suffix of both attention kernels: "" for a cache of q's width, "_kv<dtype>" narrow."""
    return f"_kv{jnp.dtype(cache_dtype).name}" if is_narrow(dtype, cache_dtype) else ""


def cache_dtype_ok(dtype, cache_dtype) -> bool:
    """Whether the kernels read a cache of ``cache_dtype`` (None = ``dtype``) with queries of ``dtype``."""
    return cache_dtype is None or jnp.dtype(cache_dtype) in (jnp.dtype(dtype), *NARROW_CACHE_DTYPES)


def supports(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, page_size: int, cache_dtype=None) -> bool:
    """Whether a model's attention shapes fit this kernel (the engine falls back to XLA otherwise);
    ``cache_dtype``: the KV cache's dtype (None = ``dtype``)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and cache_dtype_ok(dtype, cache_dtype)
            and head_dim % 64 == 0
            and num_q_heads % num_kv_heads == 0 and _padded_group(num_q_heads, num_kv_heads) <= ROWS
            and page_size % 8 == 0 and page_size <= 256 and (256 % page_size == 0 or page_size % 64 == 0))


def check_shapes(q, k_cache, v_cache, seq_ids, positions, page_table, context_lens, query_start_loc):
    """ValueError naming the first argument whose shape or dtype the ragged paged attention kernels
    (this one and ``ragged_prefill_attention``) cannot take; their configs are checked separately."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Nq, D], got {q.shape=}")
    num_tokens, num_q_heads, head_dim = q.shape
    if k_cache.ndim != 5:
        raise ValueError(f"k_cache must be [L, P, page_size, Nkv, D], got {k_cache.shape=}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{v_cache.shape=} must equal {k_cache.shape=}")
    _, _, page_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"cache head dim {kv_dim} must equal q head dim {head_dim=}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_cache.dtype != v_cache.dtype or not cache_dtype_ok(q.dtype, k_cache.dtype):
        raise ValueError(f"q must be bfloat16 or float16 and k_cache, v_cache of q's dtype or float8_e4m3fn (one "
                         f"dtype for both), got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if head_dim % 64:
        raise ValueError(f"{head_dim=} must be a multiple of 64")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_kv_heads=} must divide {num_q_heads=}")
    group_pad = _padded_group(num_q_heads, num_kv_heads)
    if group_pad > ROWS:
        raise ValueError(f"GQA group {num_q_heads // num_kv_heads} (padded {group_pad}) must be <= {ROWS}")
    if page_size % 8:
        raise ValueError(f"{page_size=} must be a multiple of 8")
    if seq_ids.shape != (num_tokens,) or positions.shape != (num_tokens,):
        raise ValueError(f"{seq_ids.shape=} and {positions.shape=} must be ({num_tokens},)")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be [B, MP], got {page_table.shape=}")
    if (error := page_table_width_error(page_table.shape[1])) is not None:
        raise ValueError(error)
    batch = page_table.shape[0]
    if context_lens.shape != (batch,) or query_start_loc.shape != (batch + 1,):
        raise ValueError(f"{context_lens.shape=} must be ({batch},) and {query_start_loc.shape=} ({batch + 1},)")


def _check_config(config: AttentionConfig, q, k_cache, page_table):
    _, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    group_pad = _padded_group(num_q_heads, num_kv_heads)
    if config.block_q is not None and config.block_q * group_pad > ROWS:
        raise ValueError(f"{config.block_q=} tokens x {group_pad} rows (GQA group {num_q_heads // num_kv_heads}, "
                         f"padded) exceed the {ROWS}-row tile; use block_q <= {ROWS // group_pad}")
    if config.block_kv % page_size:
        raise ValueError(f"{page_size=} must divide {config.block_kv=}")
    smem = smem_bytes(config, head_dim, max_pages=page_table.shape[1], kv_itemsize=k_cache.dtype.itemsize)
    if smem > SMEM_BUDGET:
        raise ValueError(f"{config=} needs {smem} bytes of SMEM > {SMEM_BUDGET} (with a {page_table.shape[1]}-page "
                         "page-table row); fewer stages or smaller block_kv")


def _qk(q_smem, k_block, block_kv: int):
    """S = Q K^T: q_smem [64, D] x k_block [block_kv, D] -> [64, block_kv] f32 (WGMMA layout)."""
    def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_block.T)
        return acc_ref[...]

    return pl.run_scoped(compute_qk, plgpu.ACC((ROWS, block_kv), jnp.float32))


# Narrow (fp8) caches: the wgmma dtype ("f16": Q and P converted to float16 too, fp8 -> f16 is one cvt per two
# elements on Hopper; "q": q's own dtype, fp8 -> bf16 through f32) and the register layout of the conversion.
NARROW_COMPUTE = "f16"
NARROW_CONVERT_LAYOUT = plgpu.Layout.WGMMA_UPCAST_2X
_F16_MAX = float(jnp.finfo(jnp.float16).max)


def compute_dtype(dtype, cache_dtype):
    """The wgmma operand dtype of queries of ``dtype`` against a cache of ``cache_dtype``."""
    return jnp.dtype(jnp.float16 if is_narrow(dtype, cache_dtype) and NARROW_COMPUTE == "f16" else dtype)


def converted_tiles_bytes(block_kv: int, head_dim: int) -> int:
    """SMEM of one computing warpgroup's converted tiles over a narrow cache (this module's kernels): the K / V tile
    [block_kv, D] and, with f16 compute, the Q tile [64, D], 2 bytes an element."""
    return (block_kv + ROWS * (NARROW_COMPUTE == "f16")) * head_dim * 2


def q_operand(q_tile, q16_smem):
    """The Q tile [64, D] as the QK wgmma's operand: itself, or (q16_smem given: f16 compute against a narrow
    cache) converted once into q16_smem, saturated to float16's range."""
    if q16_smem is None:
        return q_tile
    q16_smem[...] = jnp.clip(q_tile[...].astype(jnp.float32), -_F16_MAX, _F16_MAX).astype(q16_smem.dtype)
    plgpu.commit_smem()
    return q16_smem


def kv_operand(block, deq_smem):
    """A K or V block [block_kv, D] as the wgmma operand: the SMEM block itself, or (deq_smem given: a narrow,
    fp8 cache) the block converted in registers, 64 rows at a time, into deq_smem [block_kv, D] of the
    compute dtype (f16 directly; bf16 through f32, Hopper's ptxas has no fp8 -> bf16). The caller may
    release the narrow block as soon as this returns."""
    if deq_smem is None:
        return block
    for first in range(0, block.shape[0], ROWS):
        x = plgpu.load(block.at[pl.ds(first, ROWS)], layout=NARROW_CONVERT_LAYOUT)
        if deq_smem.dtype != jnp.float16:
            x = x.astype(jnp.float32)
        deq_smem[pl.ds(first, ROWS)] = x.astype(deq_smem.dtype)
    plgpu.commit_smem()
    return deq_smem


def _softmax_step(s, m_i, l_i, acc):
    """Online softmax (base 2) over one block of scaled, masked scores s [64, block_kv]: the row max m_i and
    sum l_i [64] updated, acc [64, D] rescaled; returns (p [64, block_kv] f32, m_new, l_new, acc)."""
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    return p, m_new, l_i, acc * lax.broadcast_in_dim(alpha, acc.shape, [0])


def accumulate_pv(acc, p, v_block, p_smem, under_wgmma=lambda: None):
    """acc [64, D] + p [64, block_kv] @ v_block [block_kv, D]; ``under_wgmma()`` runs while the wgmma does.
    On the GPU (p_smem None) P is the wgmma's register A operand, accumulated in place; the GPU interpreter
    has no register-A wgmma (nor ACC.init), so there P goes through p_smem [64, block_kv] into a fresh
    accumulator."""
    if p_smem is None:
        p16 = p.astype(v_block.dtype)

        def compute_pv_in_place(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_block)
            under_wgmma()

        return pl.run_state(compute_pv_in_place)(plgpu.ACC.init(acc))
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()

    def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_block)
        under_wgmma()
        return acc_ref[...]

    return acc + pl.run_scoped(compute_pv, plgpu.ACC(acc.shape, jnp.float32))


def store_output(out_refs, acc, m_i, l_i, q_smem, out_smem, lse_smem, *, layout: TileLayout, tok0, num_tokens,
                  kv_head, split):
    """Normalize acc [64, D] by l_i, zero the rows of padding tokens (>= num_tokens) and copy the tile of
    tokens tok0.. to the output: in q's dtype through the Q tile (no longer needed) by ``layout``'s copies,
    or f32 with its log-sum-exp (base 2) to the split's packed rows [S, Nkv, Tp * R] for the combine."""
    l_safe = jnp.maximum(l_i, 1e-30)  # rows no sequence touched (padding) have l == 0
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    out = jnp.where(layout.row_tokens(acc.shape[1]) < num_tokens - tok0, out, 0.0)
    if len(out_refs) == 1:
        (out_ref,) = out_refs
        q_smem[...] = out.astype(q_smem.dtype)
        plgpu.commit_smem()
        for gmem, tile_rows in layout.copies(out_ref, tok0, kv_head):
            plgpu.copy_smem_to_gmem(q_smem.at[tile_rows], gmem)
    else:
        out_ref, lse_ref = out_refs
        rows = pl.ds(tok0 * layout.rows_per_token, ROWS)
        out_smem[...] = out
        lse_smem[...] = m_i + jnp.log2(l_safe)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[split, kv_head, rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, kv_head, rows])
    plgpu.wait_smem_to_gmem(0)


def wait_last_releases(k_consumed, v_consumed, num_steps, stages: int) -> None:
    """The TMA producer's last act: wait for the consumers' release of the last ``stages`` of its
    ``num_steps`` K / V blocks, so every phase of the ring's "consumed" barriers is waited on."""
    for s in range(stages):
        g = num_steps - stages + s

        @pl.when(g >= 0)
        def _():
            plgpu.barrier_wait(k_consumed.at[lax.rem(g, jnp.int32(stages))])
            plgpu.barrier_wait(v_consumed.at[lax.rem(g, jnp.int32(stages))])


def initial_state(head_dim: int):
    """(acc [64, D], row max m [64], row sum l [64]) before the first KV block, in WGMMA layouts."""
    m_i = plgpu.layout_cast(jnp.full((ROWS,), _MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    return acc, m_i, l_i


def _split_range(kv_blocks, split, num_splits: int):
    """[lo, hi): the KV blocks of split ``split`` of ``num_splits`` over ``kv_blocks`` blocks."""
    return (lax.div(split * kv_blocks, jnp.int32(num_splits)), lax.div((split + 1) * kv_blocks, jnp.int32(num_splits)))


def _attention_kernel(
    layer_ref,      # [1] int32 (GMEM)
    num_tokens_ref,  # [1] int32
    seq_ids_ref,    # [Tp] int32
    positions_ref,  # [Tp] int32
    qsl_ref,        # [B + 1] int32
    page_table_ref,  # [B, rows, cols] int32 (MP zero-padded to rows * cols, see page_table_tile)
    q_ref,          # [Tp, Nq, D], or packed [Nkv, Tp * R, D] (layout.head_major None)
    k_ref,          # [L, P, page_size, Nkv, D]
    v_ref,          # [L, P, page_size, Nkv, D]
    *out_refs,      # splits == 1: out as q_ref (q dtype); else out [S, Nkv, Tp * R, D] f32, lse [S, Nkv, Tp * R] f32
    config: AttentionConfig,
    layout: TileLayout,
    sm_scale: float,
    max_pages: int,
):
    *out_refs, scratch = out_refs
    # p_smem [1, 64, block_kv] (interpreter only, else None); deq_smem [block_kv, D] (narrow cache only; no
    # leading axis: a constant index would become an operand of the PV wgmma's run_state, which Mosaic GPU
    # cannot lower); out_smem / lse_smem (split-K only); merge tiles unused.
    (q_smem, k_smem, v_smem, p_smem, deq_smem, q16_smem, out_smem, lse_smem, _, _, _, pt_smem, q_barrier, pt_barrier,
     k_barriers, v_barriers, *_) = scratch
    num_splits, num_stages, block_kv = config.num_kv_splits, config.num_stages, config.block_kv
    page_size = k_ref.shape[2]
    pages_per_block = block_kv // page_size
    pt_cols = jnp.int32(pt_smem.shape[1])
    head_dim = q_ref.shape[-1]
    q_block, kv_head, split = lax.axis_index("q_block"), lax.axis_index("kv_head"), lax.axis_index("split")
    layer, num_tokens = layer_ref[0], num_tokens_ref[0]
    block_q = layout.block_q
    tok0 = q_block * block_q

    for gmem, tile_rows in layout.copies(q_ref, tok0, kv_head):
        plgpu.copy_gmem_to_smem(gmem, q_smem.at[tile_rows], q_barrier)
    plgpu.barrier_wait(q_barrier)
    q_op = q_operand(q_smem, q16_smem)

    # Sequences intersecting this token block (tokens are ordered by sequence; padding excluded).
    last_tok = jnp.maximum(jnp.minimum(tok0 + block_q, num_tokens) - 1, 0)
    first_seq = seq_ids_ref[tok0]
    num_seqs = jnp.where(tok0 < num_tokens, seq_ids_ref[last_tok] - first_seq + 1, 0)

    wgmma_layout = plgpu.Layout.WGMMA
    row_token = layout.row_tokens(block_kv)
    col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=wgmma_layout)
    qk_scale = sm_scale * _LOG2E  # softmax in base 2

    def seq_body(i, carry):
        seq = first_seq + i
        first = jnp.maximum(qsl_ref[seq], tok0) - tok0       # first row-token of seq in block
        end = jnp.minimum(qsl_ref[seq + 1], tok0 + block_q) - tok0
        first_pos = positions_ref[tok0 + first]
        kv_end = first_pos + (end - first)                    # keys 0..kv_end-1 are visible to some row
        lo, hi = _split_range(pl.cdiv(kv_end, jnp.int32(block_kv)), split, num_splits)
        num_steps = hi - lo
        # The sequence's page-table row, once into SMEM: each TMA issue then reads its page id from SMEM
        # instead of waiting on a global load.
        plgpu.copy_gmem_to_smem(page_table_ref.at[seq], pt_smem, pt_barrier)  # [rows, cols]
        plgpu.barrier_wait(pt_barrier)

        def issue(step, slot):  # TMA-gather KV block (lo + step) of `seq` into `slot`
            for j in range(pages_per_block):
                page_idx = jnp.minimum((lo + step) * pages_per_block + j, max_pages - 1)
                page = pt_smem[lax.div(page_idx, pt_cols), lax.rem(page_idx, pt_cols)]
                rows = pl.ds(j * page_size, page_size)
                plgpu.copy_gmem_to_smem(k_ref.at[layer, page, :, kv_head], k_smem.at[slot, rows], k_barriers.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[layer, page, :, kv_head], v_smem.at[slot, rows], v_barriers.at[slot])

        for s in range(num_stages):
            pl.when(s < num_steps)(functools.partial(issue, s, s))

        def kv_body(step, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(num_stages))
            plgpu.barrier_wait(k_barriers.at[slot])
            qk = _qk(q_op, kv_operand(k_smem.at[slot], deq_smem), block_kv)
            kv_pos = col + (lo + step) * block_kv
            visible = (row_token >= first) & (row_token < end) & (kv_pos <= row_token + (first_pos - first))
            p, m_new, l_i, acc = _softmax_step(jnp.where(visible, qk * qk_scale, _MASK_VALUE), m_i, l_i, acc)
            plgpu.barrier_wait(v_barriers.at[slot])
            acc = accumulate_pv(acc, p, kv_operand(v_smem.at[slot], deq_smem), None if p_smem is None else p_smem.at[0])
            pl.when(step + num_stages < num_steps)(lambda: issue(step + num_stages, slot))
            return acc, m_new, l_i

        return lax.fori_loop(0, num_steps, kv_body, carry)

    acc, m_i, l_i = lax.fori_loop(0, num_seqs, seq_body, initial_state(head_dim))
    store_output(out_refs, acc, m_i, l_i, q_smem, out_smem, lse_smem, layout=layout, tok0=tok0, num_tokens=num_tokens,
                  kv_head=kv_head, split=split)


def _decode_kernel(
    layer_ref,      # [1] int32 (GMEM)
    num_tokens_ref,  # [1] int32
    seq_ids_ref,    # [Tp] int32
    positions_ref,  # [Tp] int32
    qsl_ref,        # [B + 1] int32 (unused: one token per CTA, its positions say what it sees)
    page_table_ref,  # [B, rows, cols] int32
    q_ref,          # as _attention_kernel's (block_q = 1, R = 64)
    k_ref,          # [L, P, page_size, Nkv, D]
    v_ref,          # [L, P, page_size, Nkv, D]
    *out_refs,      # as _attention_kernel's
    config: AttentionConfig,
    layout: TileLayout,
    sm_scale: float,
    max_pages: int,
):
    """Warp-specialized, one token per CTA: warpgroup ``consumers`` streams the token's K/V blocks of its
    split into the ring; consumer c takes steps c, c + consumers, ... (so it alone uses the slots = c mod
    consumers and waits on every phase of their barriers); consumer 1 hands its softmax state to consumer 0
    through SMEM, which merges and stores the output."""
    del qsl_ref
    *out_refs, scratch = out_refs
    # p_smem [consumers, 64, block_kv] (interpreter only); deq_smem [consumers, block_kv, D] (narrow cache only);
    # out/lse_smem split-K only; merge_* two consumers only.
    (q_smem, k_smem, v_smem, p_smem, deq_smem, q16_smem, out_smem, lse_smem, merge_acc, merge_m, merge_l, pt_smem,
     q_barrier, pt_barrier, k_full, v_full, k_consumed, v_consumed, merged) = scratch
    consumers, stages, block_kv = config.consumer_warpgroups, config.num_stages, config.block_kv
    page_size, head_dim = k_ref.shape[2], q_ref.shape[-1]
    pages_per_block = block_kv // page_size
    pt_cols = jnp.int32(pt_smem.shape[1])
    wg = lax.axis_index("wg")
    token, kv_head, split = lax.axis_index("q_block"), lax.axis_index("kv_head"), lax.axis_index("split")
    layer, position, num_tokens = layer_ref[0], positions_ref[token], num_tokens_ref[0]  # keys 0..position visible
    kv_blocks = jnp.where(token < num_tokens, pl.cdiv(position + 1, jnp.int32(block_kv)), 0)
    lo, hi = _split_range(kv_blocks, split, config.num_kv_splits)
    num_steps = hi - lo

    @pl.when(wg == consumers)
    def _producer():
        if consumers > 1:
            plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        for gmem, tile_rows in layout.copies(q_ref, token, kv_head):
            plgpu.copy_gmem_to_smem(gmem, q_smem.at[tile_rows], q_barrier)

        @pl.when(num_steps > 0)
        def _stream():
            plgpu.copy_gmem_to_smem(page_table_ref.at[seq_ids_ref[token]], pt_smem, pt_barrier)
            plgpu.barrier_wait(pt_barrier)

            @pl.loop(0, num_steps)
            def _issue(g):  # gather KV block lo + g into slot g mod stages once its consumer released it
                slot = lax.rem(g, jnp.int32(stages))
                pages = []
                for j in range(pages_per_block):
                    page_idx = jnp.minimum((lo + g) * pages_per_block + j, max_pages - 1)
                    pages.append(pt_smem[lax.div(page_idx, pt_cols), lax.rem(page_idx, pt_cols)])
                for ref, smem, full, consumed in ((k_ref, k_smem, k_full, k_consumed), (v_ref, v_smem, v_full, v_consumed)):
                    pl.when(g >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
                    for j, page in enumerate(pages):
                        plgpu.copy_gmem_to_smem(ref.at[layer, page, :, kv_head],
                                                smem.at[slot, pl.ds(j * page_size, page_size)], full.at[slot])

            wait_last_releases(k_consumed, v_consumed, num_steps, stages)

    @pl.when(wg < consumers)
    def _consumer():
        if consumers > 1:
            plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        # This warpgroup's steps i -> g = wg + i * consumers; the first `unmasked` see every key of their block.
        my_steps = lax.div(jnp.maximum(num_steps - wg, 0) + consumers - 1, jnp.int32(consumers))
        full_blocks = lax.div(position + 1, jnp.int32(block_kv))
        unmasked = jnp.minimum(lax.div(jnp.maximum(full_blocks - lo - wg, 0) + consumers - 1, jnp.int32(consumers)),
                               my_steps)
        qk_scale = sm_scale * _LOG2E  # softmax in base 2
        k_slot = lambda i: k_full.at[lax.rem(wg + i * consumers, jnp.int32(stages))]  # full barrier of step i's K
        plgpu.barrier_wait(q_barrier)
        q_op = q_operand(q_smem, None if q16_smem is None else q16_smem.at[wg])
        pl.when(my_steps > 0)(lambda: plgpu.barrier_wait(k_slot(0)))

        def step(i, carry, masked: bool):  # its K block was awaited by the step before (under its PV wgmma)
            acc, m_i, l_i = carry
            g = wg + i * consumers
            slot = lax.rem(g, jnp.int32(stages))
            deq = None if deq_smem is None else deq_smem.at[wg]
            k_block = kv_operand(k_smem.at[slot], deq)  # a narrow K block is released once converted
            if deq is not None:
                plgpu.barrier_arrive(k_consumed.at[slot])
            qk = _qk(q_op, k_block, block_kv)
            if deq is None:
                plgpu.barrier_arrive(k_consumed.at[slot])
            s = qk * qk_scale
            if masked:  # the last block: keys past the position (>= 1 key of it is visible)
                kv_pos = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA) + (lo + g) * block_kv
                s = jnp.where(kv_pos <= position, s, _MASK_VALUE)
            p, m_new, l_i, acc = _softmax_step(s, m_i, l_i, acc)
            plgpu.barrier_wait(v_full.at[slot])
            wait_next_k = lambda: pl.when(i + 1 < my_steps)(lambda: plgpu.barrier_wait(k_slot(i + 1)))
            acc = accumulate_pv(acc, p, kv_operand(v_smem.at[slot], deq), None if p_smem is None else p_smem.at[wg],
                                wait_next_k)
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l_i

        state = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), initial_state(head_dim))
        acc, m_i, l_i = lax.fori_loop(unmasked, my_steps, functools.partial(step, masked=True), state)
        store = functools.partial(store_output, out_refs, q_smem=q_smem, out_smem=out_smem, lse_smem=lse_smem,
                                  layout=layout, tok0=token, num_tokens=num_tokens, kv_head=kv_head, split=split)
        if consumers == 1:
            store(acc, m_i, l_i)
            return

        @pl.when(wg == 1)
        def _hand_over():
            merge_acc[...] = acc
            merge_m[...] = m_i
            merge_l[...] = l_i
            plgpu.barrier_arrive(merged)

        @pl.when(wg == 0)
        def _merge():
            plgpu.barrier_wait(merged)
            m_other = plgpu.load(merge_m, layout=plgpu.Layout.WGMMA.reduce(1))
            m_new = jnp.maximum(m_i, m_other)
            alpha, beta = jnp.exp2(m_i - m_new), jnp.exp2(m_other - m_new)
            l_new = l_i * alpha + plgpu.load(merge_l, layout=plgpu.Layout.WGMMA.reduce(1)) * beta
            acc_new = (acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                       + plgpu.load(merge_acc, layout=plgpu.Layout.WGMMA) * lax.broadcast_in_dim(beta, acc.shape, [0]))
            store(acc_new, m_new, l_new)


def _pack_queries(q, num_kv_heads: int, rows_per_token: int, padded_tokens: int):
    """[T, Nq, D] -> [Nkv, Tp * R, D]: rows (token, head in group), each token's group zero-padded to
    ``rows_per_token`` (R) rows, padding tokens zero. Only for groups no tile layout reads in place."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    q = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, rows_per_token - group), (0, 0)))
    return q.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_tokens * rows_per_token, head_dim)


def _rows_to_tokens(x, layout: TileLayout, num_tokens: int):
    """Tile rows -> tokens: x [S, Nkv, Tp * R, ...] (rows in ``layout``'s order) -> [S, T, Nq, ...]."""
    splits, num_kv_heads, _, *rest = x.shape
    block_q, rows_per_token = layout.block_q, layout.rows_per_token
    head_axis = 3 if layout.head_major else 4  # (block, head, token) or (token, head) rows
    x = x.reshape(splits, num_kv_heads, -1, *((rows_per_token, block_q) if layout.head_major else
                                              (block_q, rows_per_token)), *rest)
    x = jnp.moveaxis(lax.slice_in_dim(x, 0, layout.group, axis=head_axis), (1, head_axis), (3, 4))
    return x.reshape(splits, -1, num_kv_heads * layout.group, *rest)[:, :num_tokens]


# Up to this many splits the merge is written as elementwise terms, one per split: XLA makes it one loop
# fusion. As reductions over S it was two kernels (a max, then the weighted sums: a reduction cannot feed
# another in one fusion), per layer of every decode step (H100 dump, RESULTS "Session 8").
UNROLLED_MERGE_MAX_SPLITS = 16


def _combine_splits(out, lse, layout: TileLayout, num_tokens: int):
    """Merge split-K partials out [S, Nkv, Tp * R, D] f32 (normalized), lse [S, Nkv, Tp * R] (base 2) into
    [T, Nq, D] f32. The rows are taken to token order on the way in (transposes and slices XLA fuses into
    the merge as producers), so no relayout follows it."""
    out, lse = _rows_to_tokens(out, layout, num_tokens), _rows_to_tokens(lse, layout, num_tokens)
    splits = out.shape[0]
    if splits > UNROLLED_MERGE_MAX_SPLITS:
        weights = jnp.exp2(lse - lse.max(axis=0)[None])
        return (weights[..., None] * out).sum(axis=0) / weights.sum(axis=0)[..., None]
    m = functools.reduce(jnp.maximum, [lse[s] for s in range(splits)])
    weights = [jnp.exp2(lse[s] - m) for s in range(splits)]
    total = functools.reduce(jnp.add, [w[..., None] * out[s] for s, w in enumerate(weights)])
    return total / functools.reduce(jnp.add, weights)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "decode_only"))
def ragged_paged_attention(
    q,                # [T, Nq, D]
    k_cache,          # [L, P, page_size, Nkv, D]
    v_cache,          # [L, P, page_size, Nkv, D]
    layer,            # [] int32
    seq_ids,          # [T] int32
    positions,        # [T] int32
    page_table,       # [B, MP] int32
    context_lens,     # [B] int32 (validated for shape; visibility follows positions)
    query_start_loc,  # [B + 1] int32
    num_tokens,       # [] int32
    *,
    sm_scale: float,
    config: AttentionConfig | None = None,
    decode_only: bool = False,
):
    """Causal paged attention over a flat ragged token batch -> [T, Nq, D] in q's dtype. ``decode_only``
    (static): each token is the single decode token of its own sequence; picks the default config."""
    num_tok, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    if config is None:
        config = default_config(num_tok, num_q_heads, num_kv_heads, head_dim, page_size,
                                page_table.shape[1] * page_size, q.dtype, decode=decode_only, cache_dtype=k_cache.dtype)
    check_shapes(q, k_cache, v_cache, seq_ids, positions, page_table, context_lens, query_start_loc)
    _check_config(config, q, k_cache, page_table)
    layout = tile_layout(num_q_heads, num_kv_heads, tokens_per_cta(config, num_q_heads, num_kv_heads))
    p_via_smem = interpreting()
    padded = pl.cdiv(num_tok, layout.block_q) * layout.block_q
    num_q_blocks = padded // layout.block_q
    total_rows = padded * layout.rows_per_token
    if layout.head_major is None:  # no in-place tile layout (G > 8 not a multiple of 8, or G % 8 with block_q < 8)
        q_in = _pack_queries(q, num_kv_heads, layout.rows_per_token, padded)
    else:  # q read in place, padded only when T is not a multiple of block_q
        q_in = jnp.pad(q, ((0, padded - num_tok), (0, 0), (0, 0))) if padded != num_tok else q

    splits = config.num_kv_splits
    if splits == 1:
        out_type = jax.ShapeDtypeStruct(q_in.shape, q.dtype)
    else:
        out_type = (jax.ShapeDtypeStruct((splits, num_kv_heads, total_rows, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((splits, num_kv_heads, total_rows), jnp.float32))
    stages, block_kv, consumers = config.num_stages, config.block_kv, config.consumer_warpgroups
    max_pages = page_table.shape[1]
    pt_rows, pt_cols = page_table_tile(max_pages)
    tile = lambda dtype, *shape: plgpu.SMEM(shape, dtype, transforms=smem_transforms(shape[-1], dtype))
    copies = block_kv // page_size  # TMA copies per K (or V) block
    mma_dtype = compute_dtype(q.dtype, k_cache.dtype)
    scratch = (
        tile(q.dtype, ROWS, head_dim),
        tile(k_cache.dtype, stages, block_kv, head_dim),
        tile(k_cache.dtype, stages, block_kv, head_dim),
        tile(mma_dtype, max(1, consumers), ROWS, block_kv) if p_via_smem else None,
        # converted K / V and Q of each consumer warpgroup (of the one warpgroup: no leading axis)
        tile(mma_dtype, *(consumers,) * bool(consumers), block_kv, head_dim) if k_cache.dtype != q.dtype else None,
        tile(mma_dtype, *(consumers,) * bool(consumers), ROWS, head_dim) if mma_dtype != q.dtype else None,
        tile(jnp.float32, ROWS, head_dim) if splits > 1 else None,
        plgpu.SMEM((ROWS,), jnp.float32) if splits > 1 else None,
        tile(jnp.float32, ROWS, head_dim) if consumers > 1 else None,  # consumer 1's acc, m, l for consumer 0
        plgpu.SMEM((ROWS,), jnp.float32) if consumers > 1 else None,
        plgpu.SMEM((ROWS,), jnp.float32) if consumers > 1 else None,
        plgpu.SMEM((pt_rows, pt_cols), jnp.int32),
        plgpu.Barrier(num_arrivals=layout.num_copies, num_barriers=1),  # Q copies
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # K full
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # V full
    )
    if consumers:
        scratch += (plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # K consumed
                    plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # V consumed
                    plgpu.Barrier(num_arrivals=1) if consumers > 1 else None)  # consumer 1's state in SMEM
        body = functools.partial(_decode_kernel, config=config, layout=layout, sm_scale=sm_scale, max_pages=max_pages)
        threads = dict(num_threads=consumers + 1, thread_name="wg")
    else:
        body = functools.partial(_attention_kernel, config=config, layout=layout, sm_scale=sm_scale,
                                 max_pages=max_pages)
        threads = {}
    kernel = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=(scratch,),
        grid=(num_q_blocks, num_kv_heads, splits),
        grid_names=("q_block", "kv_head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **threads,
    )
    result = kernel(*kernel_metadata(layer, num_tokens, seq_ids, positions, query_start_loc, page_table, padded),
                    q_in, k_cache, v_cache)  # padding tokens' rows are zeros (in the kernel)
    if splits > 1:
        return _combine_splits(*result, layout, num_tok).astype(q.dtype)
    if layout.head_major is None:
        return _rows_to_tokens(result[None], layout, num_tok)[0]
    return result[:num_tok] if padded != num_tok else result


def ragged_paged_attention_reference(q, k_cache, v_cache, layer, seq_ids, positions, page_table,
                                     context_lens, query_start_loc, num_tokens, *, sm_scale):
    """Float32 pure-jnp reference: gathers each token's sequence pages, then dense masked softmax."""
    del context_lens, query_start_loc
    num_tok, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_ctx = page_table.shape[1] * page_size
    k_seq = k_cache[layer][page_table].reshape(page_table.shape[0], max_ctx, num_kv_heads, head_dim)
    v_seq = v_cache[layer][page_table].reshape(page_table.shape[0], max_ctx, num_kv_heads, head_dim)
    k_tok = k_seq[seq_ids].astype(jnp.float32)  # [T, ctx, Nkv, D]
    v_tok = v_seq[seq_ids].astype(jnp.float32)
    q_grouped = q.astype(jnp.float32).reshape(num_tok, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,tckd->tkgc", q_grouped, k_tok) * sm_scale
    visible = jnp.arange(max_ctx)[None, :] <= positions[:, None]  # [T, ctx]
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    out = jnp.einsum("tkgc,tckd->tkgd", jax.nn.softmax(scores, axis=-1), v_tok).reshape(num_tok, num_q_heads, head_dim)
    valid = jnp.arange(num_tok) < num_tokens
    return jnp.where(valid[:, None, None], out, 0.0)
