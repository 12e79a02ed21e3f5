"""Ragged paged attention for Hopper (Mosaic GPU): prefill chunks and decode tokens in one launch.

Owns: the attention kernel the model's attention dispatch calls, its jitted wrapper (argument
checks, GQA head packing, split-K combine), a float32 pure-jnp reference and the tuning config.
It does not own writing K/V into the cache (the model does that before calling this) nor building
the metadata (``autoglm_jax.model.attention_metadata``).

Semantics: token ``t`` (of sequence ``seq_ids[t]``) attends to cache positions
``0..positions[t]`` of its sequence, read through ``page_table``; tokens ``t >= num_tokens`` are
padding and produce zeros. Tokens are laid out sequence after sequence (``query_start_loc``).

Kernel layout. GQA groups are packed into the rows of one tile so that each K/V page is read
once per KV head, not once per query head: for KV head ``h`` the tile rows are
``block_q`` consecutive flat tokens x ``R = 64 // block_q`` rows per token (the token's ``G = Nq // Nkv``
query heads, zero-padded to R; 64 rows = one wgmma M). ``block_q`` defaults to ``64 // G_pad`` (``G``
padded to a power of two: the densest packing, for prefill chunks) and to 1 for decode-only steps
(one token per sequence), so that a CTA streams one sequence's K/V in one uninterrupted pipeline.
One CTA (one warpgroup) owns one (token block, KV head, KV split). Because the tokens of a block may belong to several sequences
(a block of decode tokens holds ``block_q`` sequences), the CTA loops over the sequences that
intersect its block; for each it copies the sequence's page-table row into SMEM (one bulk copy; the
page ids of every TMA then come from SMEM, not from dependent global loads), streams that sequence's
K/V blocks (``block_kv`` rows gathered from ``block_kv // page_size`` pages by TMA, ``num_stages``
deep) and masks rows of other sequences. Split-K (``num_kv_splits > 1``) cuts each sequence's KV range into slices handled by
different CTAs; their partial outputs and log-sum-exps are combined in XLA. That serves long
decode contexts with few sequences without a second kernel. The softmax probabilities P are the
PV wgmma's register A operand on the GPU; the GPU interpreter cannot run a register A operand, so
there P goes through an SMEM tile.
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


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tuning knobs. ``block_kv`` KV rows per pipeline step (a multiple of 64 and of page_size);
    ``num_stages`` TMA buffers in flight; ``num_kv_splits`` CTAs sharing one sequence's KV range;
    ``block_q`` flat tokens per CTA (a power of two, at most 64 // G_pad; None = 64 // G_pad)."""

    block_kv: int = 64
    num_stages: int = 2
    num_kv_splits: int = 1
    block_q: int | None = None

    def __post_init__(self):
        if self.block_q is not None and (self.block_q < 1 or self.block_q & (self.block_q - 1) or self.block_q > ROWS):
            raise ValueError(f"{self.block_q=} must be None or a power of two in [1, {ROWS}]")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"{self.block_kv=} must be 64, 128, 192 or 256")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be >= 1")
        if self.num_kv_splits < 1:
            raise ValueError(f"{self.num_kv_splits=} must be >= 1")


def smem_bytes(config: AttentionConfig, head_dim: int, itemsize: int = 2, p_via_smem: bool | None = None,
               max_pages: int = 0) -> int:
    """SMEM one CTA needs: Q tile, K/V stages, the P tile (interpreter only, None = as traced now), the
    f32 split-K output tile and one page-table row of ``max_pages`` entries."""
    p_via_smem = interpreting() if p_via_smem is None else p_via_smem
    kv = 2 * config.num_stages * config.block_kv * head_dim * itemsize
    split_out = (ROWS * head_dim + ROWS) * 4 if config.num_kv_splits > 1 else 0
    p_tile = ROWS * config.block_kv * itemsize if p_via_smem else 0
    return ROWS * head_dim * itemsize + kv + p_tile + split_out + 4 * math.prod(page_table_tile(max_pages))


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


def default_config(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   page_size: int, max_context: int, dtype, decode: bool = False) -> AttentionConfig:
    """Tuned config for this shape on the current card, else a heuristic (never fails). ``decode``: every
    token is its own sequence's (a decode step): one token per CTA."""
    key = f"T{num_tokens}_Nq{num_q_heads}_Nkv{num_kv_heads}_D{head_dim}_ps{page_size}_ctx{max_context}"
    tuned = tuning.lookup("ragged_paged_attention", dtype, key + ("_decode" if decode else ""))
    if tuned is not None:
        return AttentionConfig(**tuned)
    block_kv = max(64, page_size) if max(64, page_size) % page_size == 0 else page_size
    block_kv = 128 if block_kv == 64 and max_context >= 1024 and head_dim <= 128 else block_kv
    block_q = 1 if decode else ROWS // _padded_group(num_q_heads, num_kv_heads)
    num_ctas = pl.cdiv(num_tokens, block_q) * num_kv_heads
    if decode:
        # H100, GLM-4 heads (benchmarks/kernels.py, RESULTS "Decode attention, one token per CTA"): split
        # only up to one wave of CTAs (batch 64 x 4k: no split, 0.78 of the copy bandwidth; 3 splits
        # 0.71), down to one KV block per split for a single sequence; two stages of 128 rows beat three.
        splits = max(1, min(tuning.num_sms() // num_ctas, pl.cdiv(max_context, block_kv)))
        for stages in (2, 1):
            config = AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits, block_q=1)
            if smem_bytes(config, head_dim, max_pages=max_context // page_size) <= SMEM_BUDGET:
                return config
    # Enough CTAs to fill the card twice, but keep >= 4 KV blocks per split.
    splits = max(1, min(pl.cdiv(2 * tuning.num_sms(), num_ctas), max_context // (4 * block_kv)))
    for stages in (3, 2, 1):  # deepest pipeline that fits in SMEM
        config = AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits, block_q=block_q)
        if smem_bytes(config, head_dim, max_pages=max_context // page_size) <= SMEM_BUDGET:
            return config
    return AttentionConfig(block_kv=64, num_stages=1, num_kv_splits=splits, block_q=block_q)


def tokens_per_cta(config: AttentionConfig, num_q_heads: int, num_kv_heads: int) -> int:
    """The config's block_q, resolved (None = the densest packing, 64 // G_pad)."""
    return config.block_q or ROWS // _padded_group(num_q_heads, num_kv_heads)


def supports(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, page_size: int) -> bool:
    """Whether a model's attention shapes fit this kernel (the engine falls back to XLA otherwise)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 64 == 0
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
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k_cache, v_cache must share a 16-bit float dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
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
    smem = smem_bytes(config, head_dim, max_pages=page_table.shape[1])
    if smem > SMEM_BUDGET:
        raise ValueError(f"{config=} needs {smem} bytes of SMEM > {SMEM_BUDGET} (with a {page_table.shape[1]}-page "
                         "page-table row); fewer stages or smaller block_kv")


def _attention_kernel(
    layer_ref,      # [1] int32 (GMEM)
    num_tokens_ref,  # [1] int32
    seq_ids_ref,    # [Tp] int32
    positions_ref,  # [Tp] int32
    qsl_ref,        # [B + 1] int32
    page_table_ref,  # [B, rows, cols] int32 (MP zero-padded to rows * cols, see page_table_tile)
    q_ref,          # [Nkv, Tp * G_pad, D]: rows (token, head-in-group)
    k_ref,          # [L, P, page_size, Nkv, D]
    v_ref,          # [L, P, page_size, Nkv, D]
    *out_refs,      # splits == 1: out [Nkv, Tp*G_pad, D] (q dtype); else out [S, Nkv, Tp*G_pad, D] f32, lse [S, Nkv, Tp*G_pad] f32
    config: AttentionConfig,
    block_q: int,
    rows_per_token: int,
    sm_scale: float,
    p_via_smem: bool,
    max_pages: int,
):
    *out_refs, scratch = out_refs
    q_smem, k_smem, v_smem, p_smem, out_smem, lse_smem, pt_smem, q_barrier, pt_barrier, k_barriers, v_barriers = scratch
    num_splits, num_stages, block_kv = config.num_kv_splits, config.num_stages, config.block_kv
    page_size = k_ref.shape[2]
    pages_per_block = block_kv // page_size
    pt_cols = jnp.int32(pt_smem.shape[1])
    head_dim = q_ref.shape[-1]
    q_block, kv_head, split = lax.axis_index("q_block"), lax.axis_index("kv_head"), lax.axis_index("split")
    layer, num_tokens = layer_ref[0], num_tokens_ref[0]
    tok0 = q_block * block_q

    plgpu.copy_gmem_to_smem(q_ref.at[kv_head, pl.ds(q_block * ROWS, ROWS)], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    # Sequences intersecting this token block (tokens are ordered by sequence; padding excluded).
    last_tok = jnp.maximum(jnp.minimum(tok0 + block_q, num_tokens) - 1, 0)
    first_seq = seq_ids_ref[tok0]
    num_seqs = jnp.where(tok0 < num_tokens, seq_ids_ref[last_tok] - first_seq + 1, 0)

    wgmma_layout = plgpu.Layout.WGMMA
    row_token = lax.div(plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=wgmma_layout), rows_per_token)
    col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=wgmma_layout)
    qk_scale = sm_scale * _LOG2E  # softmax in base 2

    def seq_body(i, carry):
        seq = first_seq + i
        first = jnp.maximum(qsl_ref[seq], tok0) - tok0       # first row-token of seq in block
        end = jnp.minimum(qsl_ref[seq + 1], tok0 + block_q) - tok0
        first_pos = positions_ref[tok0 + first]
        kv_end = first_pos + (end - first)                    # keys 0..kv_end-1 are visible to some row
        kv_blocks = pl.cdiv(kv_end, jnp.int32(block_kv))
        lo = lax.div(split * kv_blocks, jnp.int32(num_splits))
        hi = lax.div((split + 1) * kv_blocks, jnp.int32(num_splits))
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

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
            kv_pos = col + (lo + step) * block_kv
            visible = (row_token >= first) & (row_token < end) & (kv_pos <= row_token + (first_pos - first))
            s_ij = jnp.where(visible, qk * qk_scale, _MASK_VALUE)
            m_new = jnp.maximum(m_i, s_ij.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s_ij - lax.broadcast_in_dim(m_new, s_ij.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_barriers.at[slot])

            if p_via_smem:
                # The GPU interpreter has no register-A wgmma (nor ACC.init): P goes through SMEM
                # into a fresh accumulator.
                p_smem[...] = p.astype(p_smem.dtype)
                plgpu.commit_smem()

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    return acc_ref[...]

                acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
            else:
                p16 = p.astype(v_smem.dtype)

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            pl.when(step + num_stages < num_steps)(lambda: issue(step + num_stages, slot))
            return acc, m_new, l_i

        return lax.fori_loop(0, num_steps, kv_body, carry)

    m_i = plgpu.layout_cast(jnp.full((ROWS,), _MASK_VALUE, jnp.float32), wgmma_layout.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), wgmma_layout.reduce(1))
    acc = plgpu.layout_cast(jnp.full((ROWS, head_dim), 0.0, jnp.float32), wgmma_layout)
    acc, m_i, l_i = lax.fori_loop(0, num_seqs, seq_body, (acc, m_i, l_i))

    l_safe = jnp.maximum(l_i, 1e-30)  # rows no sequence touched (padding) have l == 0
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    rows = pl.ds(q_block * ROWS, ROWS)
    if num_splits == 1:
        (out_ref,) = out_refs
        q_smem[...] = out.astype(q_smem.dtype)  # Q is no longer needed: reuse its buffer
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[kv_head, rows])
    else:
        out_ref, lse_ref = out_refs
        out_smem[...] = out
        lse_smem[...] = m_i + jnp.log2(l_safe)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[split, kv_head, rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, kv_head, rows])
    plgpu.wait_smem_to_gmem(0)


def _pack_queries(q, num_kv_heads: int, rows_per_token: int, padded_tokens: int):
    """[T, Nq, D] -> [Nkv, Tp * R, D]: rows (token, head in group), each token's group zero-padded to
    ``rows_per_token`` (R) rows, padding tokens zero."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    q = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, rows_per_token - group), (0, 0)))
    return q.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_tokens * rows_per_token, head_dim)


def _unpack_output(out, num_tokens: int, num_q_heads: int, rows_per_token: int, valid):
    """[Nkv, Tp * R, D] -> [T, Nq, D] with padding tokens zeroed."""
    num_kv_heads, _, head_dim = out.shape
    group = num_q_heads // num_kv_heads
    out = out.reshape(num_kv_heads, -1, rows_per_token, head_dim)[:, :num_tokens, :group]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    return jnp.where(valid[:, None, None], out, 0)


def _combine_splits(out, lse):
    """Merge split-K partials: out [S, Nkv, R, D] f32 (normalized), lse [S, Nkv, R] (base 2)."""
    lse_max = lse.max(axis=0)
    weights = jnp.exp2(lse - lse_max[None])
    return (weights[..., None] * out).sum(axis=0) / weights.sum(axis=0)[..., None]


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
                                page_table.shape[1] * page_size, q.dtype, decode=decode_only)
    check_shapes(q, k_cache, v_cache, seq_ids, positions, page_table, context_lens, query_start_loc)
    _check_config(config, q, k_cache, page_table)
    block_q = tokens_per_cta(config, num_q_heads, num_kv_heads)
    rows_per_token = ROWS // block_q
    p_via_smem = interpreting()
    padded = pl.cdiv(num_tok, block_q) * block_q
    num_q_blocks = padded // block_q
    total_rows = padded * rows_per_token
    q_packed = _pack_queries(q, num_kv_heads, rows_per_token, padded)

    splits = config.num_kv_splits
    if splits == 1:
        out_type = jax.ShapeDtypeStruct((num_kv_heads, total_rows, head_dim), q.dtype)
    else:
        out_type = (jax.ShapeDtypeStruct((splits, num_kv_heads, total_rows, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((splits, num_kv_heads, total_rows), jnp.float32))
    stages = config.num_stages
    max_pages = page_table.shape[1]
    pt_rows, pt_cols = page_table_tile(max_pages)
    scratch = (
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=smem_transforms(head_dim, q.dtype)),
        plgpu.SMEM((stages, config.block_kv, head_dim), q.dtype, transforms=smem_transforms(head_dim, q.dtype)),
        plgpu.SMEM((stages, config.block_kv, head_dim), q.dtype, transforms=smem_transforms(head_dim, q.dtype)),
        plgpu.SMEM((ROWS, config.block_kv), q.dtype, transforms=smem_transforms(config.block_kv, q.dtype)) if p_via_smem else None,
        plgpu.SMEM((ROWS, head_dim), jnp.float32, transforms=smem_transforms(head_dim, jnp.float32)) if splits > 1 else None,
        plgpu.SMEM((ROWS,), jnp.float32) if splits > 1 else None,
        plgpu.SMEM((pt_rows, pt_cols), jnp.int32),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=config.block_kv // page_size, num_barriers=stages),
        plgpu.Barrier(num_arrivals=config.block_kv // page_size, num_barriers=stages),
    )
    kernel = plgpu.kernel(
        functools.partial(_attention_kernel, config=config, block_q=block_q, rows_per_token=rows_per_token,
                          sm_scale=sm_scale, p_via_smem=p_via_smem, max_pages=max_pages),
        out_type=out_type,
        scratch_types=(scratch,),
        grid=(num_q_blocks, num_kv_heads, splits),
        grid_names=("q_block", "kv_head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    result = kernel(*kernel_metadata(layer, num_tokens, seq_ids, positions, query_start_loc, page_table, padded),
                    q_packed, k_cache, v_cache)
    out = result if splits == 1 else _combine_splits(*result)
    valid = jnp.arange(num_tok) < num_tokens
    return _unpack_output(out, num_tok, num_q_heads, rows_per_token, valid).astype(q.dtype)


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
