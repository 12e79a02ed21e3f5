"""Warp-specialized (FlashAttention-3 style) ragged paged attention for long prefills on Hopper (Mosaic GPU).

Owns: the prefill attention kernel, its jitted wrapper and its tuning config (``PrefillAttentionConfig``,
``default_config``, ``supports``). Semantics and argument list are those of
``ragged_paged_attention.ragged_paged_attention`` (the model's dispatch picks this kernel for large
token buckets); it reuses that module's argument checks, metadata operands and float32 reference. It does
not own writing K/V into the cache nor building the metadata.

Semantics: token ``t`` (of sequence ``seq_ids[t]``) attends to cache positions ``0..positions[t]``
of its sequence, read through ``page_table``; tokens ``t >= num_tokens`` are padding and produce
zeros. Tokens are laid out sequence after sequence (``query_start_loc``) and the positions of one
sequence's tokens in a step are consecutive (as ``AttentionMetadata.build`` lays them out).

Kernel layout (``rpa.TileLayout``, shared with the paged kernel). The kernel reads q and writes out in the
model's [T, Nq, D] layout (no XLA relayout around it). For KV head ``h`` (query heads ``h*G .. h*G + G - 1``,
``G`` padded to a power of two ``G_pad``) a 64-row Q tile holds ``block_q = 64 / G_pad`` consecutive tokens
x ``G_pad`` heads, gathered by TMA straight from q (SMEM row slices must be whole 8-row tiles, which fixes the
row order):
  * token-major, rows (token, head), when ``G % 8 == 0`` (GLM-4: G 16, block_q 4): one [G, D] copy per token,
    ``q[t, h*G : h*G + G]`` (contiguous) into rows ``i*G_pad ..``;
  * head-major, rows (head, token), when ``G_pad <= 8`` (Llama family: G 1..8, block_q 8..64): one strided
    [block_q, D] copy per head, ``q[t0 : t0 + block_q, h*G + g]``, into rows ``g*block_q ..``.
Other groups (G > 8 and not a multiple of 8) are not supported (``supports``). Rows of pad heads
(G < G_pad) are never loaded nor stored (softmax is per row, so whatever they hold stays in them). The output
leaves through the same SMEM tile by the same copies, rows of padding tokens (>= num_tokens) set to zero
first. When T is not a multiple of a CTA's 2 x block_q tokens the wrapper pads q and slices the output.
One CTA owns (2 x block_q tokens, one KV head) and runs three warpgroups:
  * two compute warpgroups, each with one 64-row Q tile [64, D] in SMEM, its softmax state
    (row max / sum, base 2) and output accumulator [64, D] f32 in registers (WGMMA layout);
    S = Q K^T by wgmma into a fresh accumulator, P = exp2(S - m) rounded to the input dtype and fed
    to the PV wgmma as the register A operand (through a [64, block_kv] SMEM tile in the CPU
    interpreter, which runs wgmma on SMEM operands only);
  * one TMA warpgroup streaming K/V blocks [block_kv, D] (gathered from block_kv / page_size pages,
    or a slice of one page when pages are larger) into a ring of ``num_stages`` slots: "full"
    barriers (TMA -> consumers), "consumed" barriers (both compute warpgroups -> TMA). Per sequence it
    first copies the sequence's page-table row into SMEM (one bulk copy of the [rows, cols] tile of
    ``rpa.page_table_tile``), so the page id of every TMA is an SMEM read, not a dependent global load.
Both compute warpgroups read every K/V block, so a block feeds 128 query rows. The tokens of a CTA
may belong to several sequences; TMA and compute warpgroups walk the same schedule: for each
sequence intersecting the CTA's tokens, its KV blocks 0 .. ceil((last position + 1) / block_kv).
A compute warpgroup takes, per sequence, the blocks visible to all its rows without any mask
(its 64 rows are all of that sequence and the block ends at or before its first position), masks
the diagonal blocks (and blocks of tiles shared by several sequences), and only waits / releases
blocks past its own last position. Each compute warpgroup waits for the next K block while its PV
wgmma runs (as JAX's FA3 kernel does), so a late K block costs max(PV, TMA), not their sum. Optional
ping-pong schedule barrier between the two compute warpgroups (one's softmax overlaps the other's
wgmmas). CTAs are launched latest tokens first (the longest KV ranges first) so the tail of the grid
is short.

An fp8 (e4m3) cache: the TMA warpgroup gathers fp8 blocks into a ring of ``narrow_stages`` slots and
converts each K, then V, block once (``rpa.kv_operand``, the whole warpgroup, ``narrow_stages - 1`` blocks'
copies in flight meanwhile) into the ``num_stages``-deep float16 ring the compute warpgroups read as they read
a bf16 ring ("full" barriers: one arrival per converted block); each compute warpgroup converts its Q tile once
(``rpa.q_operand``). Before (session 14) each compute warpgroup converted every block itself, i.e. twice per
block: H100, 4k tokens 457 µs, now 375 µs (bf16 268 µs; RESULTS "Session 15"). The paged kernel's decode
consumers keep converting their own blocks: there this design was slower (one converting warpgroup for two
consumers).

Measured on an H100 and not kept (RESULTS "Session 16"): a persistent grid (one CTA an SM walking work items in a
static snake order: +5% at 4k, +1% at 16k, but -8% to -14% where item lengths are uneven, e.g. the engine's mixed
steps, which the hardware's dynamic CTA scheduling balances better), and FlashAttention-3's intra-warpgroup overlap
(softmax of block j under the PV wgmma of block j - 1: no gain next to the ping-pong, and its first version made
ptxas serialize every wgmma, warning C7513, because P's conversion ran while the wgmma reading P's registers was in
flight). What the 16k gap to cuDNN (3% at 16-token pages) is made of: the TMA warpgroup issues one copy per page,
each behind a warpgroup barrier (Pallas' automatic barrier before an async copy) - at 64-token pages the kernel is at
or above cuDNN from 4k to 16k (H100 and H200), which is why the engine's default page is 64 (session 17). Dropping
those barriers (``auto_barriers=False``: ``unsafe_no_auto_barriers``, correct on the GPU with the kernel's own
``commit_smem`` before the page-table row is reloaded) did not close the gap at 16-token pages (H200, 16k: 0.97x
cuDNN either way) and gains 1-3% at 64, within a run's noise: not the default.

Shapes: q [T, Nq, D], k_cache / v_cache [L, P, page_size, Nkv, D] (q's dtype or float8_e4m3fn), page_table [B, MP],
seq_ids / positions [T], context_lens [B], query_start_loc [B + 1] -> out [T, Nq, D] (q's dtype).
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

from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import tuning
from pallas_kernels._interpret import interpreting
from pallas_kernels._smem import smem_transforms

ROWS = rpa.ROWS  # packed query rows per compute warpgroup (one wgmma M)
COMPUTE_WGS = 2
SMEM_BUDGET = rpa.SMEM_BUDGET
_COMPUTE_REGISTERS, _TMA_REGISTERS = 232, 40  # per thread, as JAX's FA3 kernel sets them
# A narrow cache: the TMA warpgroup converts 64 x D blocks in registers (64 fp8 values a thread at D 128, 64 f16
# out). The three warpgroups share what the CTA was launched with, 168 a thread (65,536 / 384, rounded down to 8):
# setmaxnreg.inc past 2 x 208 + 88 = 504 would wait forever for registers no warpgroup gives back (a hang).
_NARROW_COMPUTE_REGISTERS, _NARROW_TMA_REGISTERS = 208, 88
LAUNCH_REGISTERS_3WG = 65536 // (3 * 128) // 8 * 8


@dataclasses.dataclass(frozen=True)
class PrefillAttentionConfig:
    """Tuning knobs. ``block_kv`` K/V rows per pipeline step (64..256, a multiple of 64; it and the
    page size must divide one another); ``num_stages`` K/V slots in the TMA ring (>= 2);
    ``schedule_barrier``: ping-pong the two compute warpgroups (softmax of one under the other's wgmma);
    ``narrow_stages``: over a narrow (fp8) cache, slots of the fp8 ring the TMA warpgroup gathers into and
    converts from into the ``num_stages``-deep ring the compute warpgroups read (unused otherwise);
    ``auto_barriers``: False compiles with ``unsafe_no_auto_barriers`` (no warpgroup ``bar.sync`` before each
    TMA copy nor around SMEM stores; the kernel's own ``commit_smem`` calls and mbarriers order what must be)."""

    block_kv: int = 128
    num_stages: int = 2
    schedule_barrier: bool = True
    narrow_stages: int = 2
    auto_barriers: bool = True

    def __post_init__(self):
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"{self.block_kv=} must be 64, 128, 192 or 256")
        if self.num_stages < 2:
            raise ValueError(f"{self.num_stages=} must be >= 2")
        if self.narrow_stages < 1:
            raise ValueError(f"{self.narrow_stages=} must be >= 1")


def _narrow_cache_bytes(config: PrefillAttentionConfig, head_dim: int, kv_itemsize: int) -> int:
    """SMEM over a narrow cache besides the Q/O tiles: the fp8 K/V ring, the converted (2-byte) K/V ring the
    compute warpgroups read and, with f16 compute, each compute warpgroup's converted [64, D] Q tile."""
    narrow = 2 * config.narrow_stages * config.block_kv * head_dim * kv_itemsize
    converted = 2 * config.num_stages * config.block_kv * head_dim * 2
    return narrow + converted + COMPUTE_WGS * ROWS * head_dim * 2 * (rpa.NARROW_COMPUTE == "f16")


def _convert_step(g, tensors, narrow_stages: int, stages: int) -> None:
    """The TMA warpgroup over a narrow (fp8) cache, step ``g`` (traced): for K, then V, wait for
    the narrow block in slot g mod narrow_stages, wait until the compute warpgroups released slot
    g mod stages of the converted ring (its use ``stages`` steps back), convert the block into it
    (``rpa.kv_operand``: the whole warpgroup, then a proxy fence and a warpgroup barrier, so the narrow slot may be
    refilled next) and arrive on the slot's "full" barrier (one arrival). ``tensors``: per K and V,
    (narrow ring [narrow_stages, block_kv, D], its TMA barriers, converted ring [stages, block_kv, D], its
    "full" barriers, its "consumed" barriers). The compute warpgroups then read the converted ring exactly as
    they read a ring of q's dtype (no conversion of their own)."""
    nslot, slot = lax.rem(g, jnp.int32(narrow_stages)), lax.rem(g, jnp.int32(stages))
    for narrow, narrow_full, wide, full, consumed in tensors:
        plgpu.barrier_wait(narrow_full.at[nslot])
        pl.when(g >= stages)(functools.partial(plgpu.barrier_wait, consumed.at[slot]))
        rpa.kv_operand(narrow.at[nslot], wide.at[slot])
        plgpu.barrier_arrive(full.at[slot])


def _convert_behind(g, tensors, narrow_stages: int, stages: int) -> None:
    """Called by the TMA warpgroup right after it issued step ``g``'s narrow copies into slot g mod
    narrow_stages: convert step g - (narrow_stages - 1), so that narrow_stages - 1 steps' copies stay in flight
    while one converts (step g's slot was freed by the conversion of step g - narrow_stages, one call earlier)."""
    lag = narrow_stages - 1
    pl.when(g >= lag)(lambda: _convert_step(g - lag, tensors, narrow_stages, stages))


def _convert_rest(num_steps, tensors, narrow_stages: int, stages: int) -> None:
    """After the last issue: convert the last narrow_stages - 1 steps of ``num_steps`` (traced) still pending."""
    lag = narrow_stages - 1
    for d in range(lag):
        step = num_steps - lag + d
        pl.when(step >= 0)(functools.partial(_convert_step, step, tensors, narrow_stages, stages))


def smem_bytes(config: PrefillAttentionConfig, head_dim: int, itemsize: int = 2, max_pages: int = 0,
               kv_itemsize: int | None = None) -> int:
    """SMEM one CTA needs on the GPU: two Q/O tiles, the K/V ring (``kv_itemsize`` bytes an element, None =
    ``itemsize``; a narrow (fp8) cache: the fp8 ring, the converted ring and each compute warpgroup's f16 Q tile),
    and one page-table row of ``max_pages`` entries (the interpreter adds two P tiles). At D 128, bf16: block_kv
    128, 32 KiB + 64 KiB a stage, so a third stage (224 KiB + the row) does not fit; fp8: block_kv 64, 64 KiB of
    Q tiles + 32 KiB a converted stage + 16 KiB an fp8 stage (three of each: 208 KiB)."""
    kv_itemsize = itemsize if kv_itemsize is None else kv_itemsize
    q_tiles = COMPUTE_WGS * ROWS * head_dim * itemsize
    if kv_itemsize == itemsize:
        kv = 2 * config.num_stages * config.block_kv * head_dim * kv_itemsize
    else:
        kv = _narrow_cache_bytes(config, head_dim, kv_itemsize)
    return q_tiles + kv + 4 * math.prod(rpa.page_table_tile(max_pages))


def config_error(config: PrefillAttentionConfig, head_dim: int, page_size: int, max_pages: int = 0,
                 kv_itemsize: int = 2) -> str | None:
    """Why ``config`` cannot run this head dim / page size / page-table width / cache element size (bf16
    queries), or None when it can."""
    if config.block_kv % page_size and page_size % config.block_kv:
        return f"{page_size=} and {config.block_kv=} must divide one another"
    if (error := rpa.page_table_width_error(max_pages)) is not None:
        return error
    smem = smem_bytes(config, head_dim, max_pages=max_pages, kv_itemsize=kv_itemsize)
    if smem > SMEM_BUDGET:
        return (f"{config=} needs {smem} bytes of SMEM > {SMEM_BUDGET} at {head_dim=} (with a {max_pages}-page "
                "page-table row); fewer stages or smaller block_kv")
    return None


def _heuristic_config(head_dim: int, page_size: int, max_pages: int = 0, kv_itemsize: int = 2) -> PrefillAttentionConfig:
    """128-row K/V blocks (64 past head dim 128, when the page size needs it, or over a narrow cache, whose
    converted ring takes the room), deepest ring that fits (a narrow cache: the converted ring first)."""
    narrow = kv_itemsize < 2
    block_kv = 128 if head_dim <= 128 and (128 % page_size == 0 or page_size % 128 == 0) and not narrow else 64
    shapes = ((3, 3), (3, 2), (2, 3), (2, 2), (2, 1)) if narrow else ((4, 2), (3, 2), (2, 2))
    for stages, narrow_stages in shapes:
        config = PrefillAttentionConfig(block_kv=block_kv, num_stages=stages, narrow_stages=narrow_stages)
        if smem_bytes(config, head_dim, max_pages=max_pages, kv_itemsize=kv_itemsize) <= SMEM_BUDGET:
            return config
    return PrefillAttentionConfig(block_kv=64, num_stages=2, narrow_stages=1)


def default_config(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                   max_context: int, dtype, cache_dtype=None) -> PrefillAttentionConfig:
    """Tuned config for this shape on the current card, else a heuristic (never fails); a narrow
    ``cache_dtype`` (None = ``dtype``) looks up its own entries (suffix ``_kv<dtype>``)."""
    key = f"T{num_tokens}_Nq{num_q_heads}_Nkv{num_kv_heads}_D{head_dim}_ps{page_size}_ctx{max_context}"
    tuned = tuning.lookup("ragged_prefill_attention", dtype, key + rpa.cache_key_suffix(dtype, cache_dtype))
    if tuned is not None:
        return PrefillAttentionConfig(**tuned)
    return _heuristic_config(head_dim, page_size, max_context // page_size, jnp.dtype(cache_dtype or dtype).itemsize)


def supports(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, page_size: int, cache_dtype=None) -> bool:
    """Whether a model's attention shapes fit this kernel with its heuristic config (``cache_dtype`` as
    ``rpa.supports`` takes it)."""
    kv_itemsize = jnp.dtype(cache_dtype or dtype).itemsize
    return (rpa.supports(num_q_heads, num_kv_heads, head_dim, dtype, page_size, cache_dtype)
            and rpa.head_major(num_q_heads, num_kv_heads) is not None
            and config_error(_heuristic_config(head_dim, page_size, kv_itemsize=kv_itemsize), head_dim, page_size,
                             kv_itemsize=kv_itemsize) is None)


def _prefill_kernel(
    layer_ref,       # [1] int32 (GMEM)
    num_tokens_ref,  # [1] int32
    seq_ids_ref,     # [Tp] int32
    positions_ref,   # [Tp] int32
    qsl_ref,         # [B + 1] int32
    page_table_ref,  # [B, rows, cols] int32 (MP zero-padded to rows * cols, see rpa.page_table_tile)
    q_ref,           # [Tp, Nq, D]
    k_ref,           # [L, P, page_size, Nkv, D]
    v_ref,           # [L, P, page_size, Nkv, D]
    out_ref,         # [Tp, Nq, D]
    scratch,
    *,
    config: PrefillAttentionConfig,
    layout: rpa.TileLayout,  # Q / O tile rows (token-major or head-major, never packed)
    num_q_blocks: int,
    sm_scale: float,
    max_pages: int,
):
    # q_smem [2, 64, D] (also the output tile); k_smem, v_smem [stages, block_kv, D] (the wgmma dtype: the cache's,
    # or converted by the TMA warpgroup from k_narrow / v_narrow [narrow_stages, block_kv, D], barriers nk_full /
    # nv_full, over a narrow cache); p_smem [2, 64, block_kv] (interpreter only, else None); q16_smem [2, 64, D]
    # each compute warpgroup's converted Q (narrow cache only); pt_smem [rows, cols] int32; barriers as named.
    (q_smem, k_smem, v_smem, p_smem, q16_smem, pt_smem, q_barriers, pt_barrier, k_full, v_full, k_consumed,
     v_consumed, schedule, k_narrow, v_narrow, nk_full, nv_full) = scratch
    narrow = k_narrow is not None
    stages, block_kv, block_q = config.num_stages, config.block_kv, layout.block_q
    page_size, head_dim = k_ref.shape[2], q_ref.shape[-1]
    pt_cols = jnp.int32(pt_smem.shape[1])
    copies = max(1, block_kv // page_size)  # TMA copies per K (or V) block
    copy_rows = min(block_kv, page_size)
    tile_tokens = COMPUTE_WGS * block_q
    wg, kv_head = lax.axis_index("wg"), lax.axis_index("kv_head")
    q_block = num_q_blocks - 1 - lax.axis_index("q_block")  # latest tokens (longest KV ranges) first
    layer, num_tokens = layer_ref[0], num_tokens_ref[0]
    tok0 = q_block * tile_tokens

    # Sequences intersecting this CTA's tokens (tokens are ordered by sequence; padding excluded).
    last_tok = jnp.maximum(jnp.minimum(tok0 + tile_tokens, num_tokens) - 1, 0)
    first_seq = seq_ids_ref[tok0]
    num_seqs = jnp.where(tok0 < num_tokens, seq_ids_ref[last_tok] - first_seq + 1, 0)

    def seq_span(i):
        """Sequence i of the CTA: (seq, its CTA tokens [first, end), position of token `first`, KV blocks)."""
        seq = first_seq + i
        first = jnp.maximum(qsl_ref[seq], tok0) - tok0
        end = jnp.minimum(qsl_ref[seq + 1], tok0 + tile_tokens) - tok0
        first_pos = positions_ref[tok0 + first]
        return seq, first, end, first_pos, pl.cdiv(first_pos + end - first, jnp.int32(block_kv))

    def sync_schedule():  # ping-pong point of the two compute warpgroups
        if config.schedule_barrier:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg == COMPUTE_WGS)
    def _tma_warpgroup():
        plgpu.set_max_registers(_NARROW_TMA_REGISTERS if narrow else _TMA_REGISTERS, action="decrease")
        if narrow:  # per K and V: fp8 ring, its TMA barriers, converted ring, its full / consumed barriers
            converted = ((k_narrow, nk_full, k_smem, k_full, k_consumed),
                         (v_narrow, nv_full, v_smem, v_full, v_consumed))

        def block_pages(block):
            """(page, rows in the page) of each TMA copy of KV block `block` of the sequence whose page-table
            row is in pt_smem, read before the waits and copies; K and V share them."""
            pages = []
            for j in range(copies):
                kv_row = block * block_kv + j * copy_rows
                page_idx = jnp.minimum(lax.div(kv_row, jnp.int32(page_size)), max_pages - 1)
                page = pt_smem[lax.div(page_idx, pt_cols), lax.rem(page_idx, pt_cols)]
                in_page = lax.rem(kv_row, jnp.int32(page_size))
                rows = slice(None) if copy_rows == page_size else pl.ds(in_page, copy_rows)
                pages.append((page, rows))
            return pages

        def issue(ref, smem, barrier, pages):  # gather one K (or V) block into smem [block_kv, D]
            for j, (page, rows) in enumerate(pages):
                plgpu.copy_gmem_to_smem(ref.at[layer, page, rows, kv_head], smem.at[pl.ds(j * copy_rows, copy_rows)],
                                        barrier)

        def seq_body(i, g):  # g: steps issued so far (over all sequences of the CTA)
            seq, *_, num_blocks = seq_span(i)
            # This warpgroup alone reads pt_smem. Every thread has read the previous sequence's page ids
            # before this copy overwrites the row: the warpgroup barrier of commit_smem (with auto barriers
            # off, nothing else orders them), whose proxy fence orders those reads before the async write.
            plgpu.commit_smem()
            plgpu.copy_gmem_to_smem(page_table_ref.at[seq], pt_smem, pt_barrier)
            plgpu.barrier_wait(pt_barrier)

            def block_body(block, g):
                pages = block_pages(block)
                if narrow:  # into the fp8 ring (its slot freed by this warpgroup's own conversion), then convert
                    nslot = lax.rem(g, jnp.int32(config.narrow_stages))
                    issue(k_ref, k_narrow.at[nslot], nk_full.at[nslot], pages)
                    issue(v_ref, v_narrow.at[nslot], nv_full.at[nslot], pages)
                    _convert_behind(g, converted, config.narrow_stages, stages)
                    return g + 1
                slot = lax.rem(g, jnp.int32(stages))
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(k_consumed.at[slot]))
                issue(k_ref, k_smem.at[slot], k_full.at[slot], pages)
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(v_consumed.at[slot]))
                issue(v_ref, v_smem.at[slot], v_full.at[slot], pages)
                return g + 1

            return lax.fori_loop(0, num_blocks, block_body, g)

        total_steps = lax.fori_loop(0, num_seqs, seq_body, jnp.int32(0))
        if narrow:
            _convert_rest(total_steps, converted, config.narrow_stages, stages)
        rpa.wait_last_releases(k_consumed, v_consumed, total_steps, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _compute_warpgroup():
        plgpu.set_max_registers(_NARROW_COMPUTE_REGISTERS if narrow else _COMPUTE_REGISTERS, action="increase")
        # K/V steps of the CTA (each sequence has >= 1). Counted here and in the TMA branch, not once at the top
        # level: there the loop makes every warpgroup's program too costly for XLA:CPU to run inline in the CPU
        # interpreter; on its thread pool (a thread a core) two warpgroups blocked in barrier waits starve the
        # third on a 2-core machine (a deadlock).
        total_steps = lax.fori_loop(0, num_seqs, lambda i, total: total + seq_span(i)[-1], jnp.int32(0))
        q_tile = q_smem.at[wg]
        tile_tok0 = tok0 + wg * block_q  # the tile's first token

        for gmem, tile_rows in layout.copies(q_ref, tile_tok0, kv_head):
            plgpu.copy_gmem_to_smem(gmem, q_tile.at[tile_rows], q_barriers.at[wg])
        plgpu.barrier_wait(q_barriers.at[wg])
        q_op = rpa.q_operand(q_tile, None if q16_smem is None else q16_smem.at[wg])

        wgmma_layout = plgpu.Layout.WGMMA

        qk_scale = sm_scale * rpa._LOG2E  # softmax in base 2
        bcast_rows = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])

        def wait_next_k(g):  # wait for the K block of step g + 1 (if any) before it is needed
            pl.when(g + 1 < total_steps)(lambda: plgpu.barrier_wait(k_full.at[lax.rem(g + 1, jnp.int32(stages))]))

        def wait_v(slot):  # end of softmax: let the other warpgroup's wgmma go first, then wait for V
            if config.schedule_barrier:
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_wait(schedule)
            else:
                plgpu.barrier_wait(v_full.at[slot])

        def kv_step(g, block, carry, visible_fn):
            """One K/V block: S = Q K^T, online softmax, acc += P V. visible_fn(block): the [64, block_kv]
            mask, or None for a block every row sees whole. Its K block was awaited by the step before."""
            acc, m_i, l_i = carry
            slot = lax.rem(g, jnp.int32(stages))
            k_block = k_smem.at[slot]

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_op, k_block.T)
                sync_schedule()  # the other warpgroup's softmax runs under this wgmma
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if visible_fn is None:  # the row max is kept scaled: one FMA per score
                m_new = jnp.maximum(m_i, qk.max(axis=1) * qk_scale)
                p = jnp.exp2(qk * qk_scale - bcast_rows(m_new, qk.shape))
            else:  # masked after scaling: a fully masked row gets exp2(MASK - MASK) = 1 exactly, wiped by a later
                # alpha = 0 (no FMA there: MASK - round(MASK) is not 0 and would give inf)
                s = jnp.where(visible_fn(block), qk * qk_scale, rpa._MASK_VALUE)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                p = jnp.exp2(s - bcast_rows(m_new, s.shape))
            alpha = jnp.exp2(m_i - m_new)
            acc = acc * bcast_rows(alpha, acc.shape)
            l_i = l_i * alpha + p.sum(axis=1)
            p = p.astype(k_block.dtype)
            if config.schedule_barrier:  # softmax done before the barrier (as JAX's FA3 kernel orders it)
                acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
            wait_v(slot)
            # acc + P V; the next K is awaited under the wgmma
            acc = rpa.accumulate_pv(acc, p, v_smem.at[slot], None if p_smem is None else p_smem.at[wg],
                                    lambda: wait_next_k(g))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l_i

        def skip_step(g):
            """A block past this warpgroup's rows: keep the barrier phases (and the ping-pong) in step."""
            slot = lax.rem(g, jnp.int32(stages))
            sync_schedule()
            plgpu.barrier_arrive(k_consumed.at[slot])
            wait_v(slot)
            plgpu.barrier_arrive(v_consumed.at[slot])
            wait_next_k(g)

        def seq_body(i, carry):
            acc, m_i, l_i, g = carry
            _, first, end, first_pos, num_blocks = seq_span(i)
            # This warpgroup's tokens of the sequence: [lo, hi) of its block_q; token t at position pos0 + t.
            lo = jnp.clip(first - wg * block_q, 0, block_q)
            hi = jnp.clip(end - wg * block_q, 0, block_q)
            pos0 = first_pos - first + wg * block_q
            own_blocks = jnp.where(lo < hi, pl.cdiv(pos0 + hi, jnp.int32(block_kv)), 0)
            whole_tile = (lo == 0) & (hi == block_q)  # every row is of this sequence: no row mask needed
            unmasked = jnp.where(whole_tile, lax.div(pos0 + 1, jnp.int32(block_kv)), 0)

            def masked_visible(block):  # built per masked block: two [64, block_kv] iotas held across the
                # loop would cost 2 x 64 registers a thread beside the accumulators
                row_token = layout.row_tokens(block_kv)
                kv_pos = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=wgmma_layout) + block * block_kv
                return (row_token >= lo) & (row_token < hi) & (kv_pos <= row_token + pos0)

            def body(visible_fn):
                return lambda block, c: (*kv_step(c[3] + block, block, c[:3], visible_fn), c[3])

            state = (acc, m_i, l_i, g)
            state = lax.fori_loop(0, unmasked, body(None), state)
            state = lax.fori_loop(unmasked, own_blocks, body(masked_visible), state)

            pl.loop(own_blocks, num_blocks)(lambda block: skip_step(g + block))
            return (*state[:3], g + num_blocks)

        pl.when(wg == 1)(sync_schedule)  # offset the two warpgroups by half a step
        pl.when(total_steps > 0)(lambda: plgpu.barrier_wait(k_full.at[0]))  # the first step's K
        acc, m_i, l_i, _ = lax.fori_loop(0, num_seqs, seq_body, (*rpa.initial_state(head_dim), jnp.int32(0)))
        pl.when(wg == 0)(sync_schedule)
        # normalized, padding tokens zeroed, out through the Q tile (no longer needed) by the layout's copies
        rpa.store_output((out_ref,), acc, m_i, l_i, q_tile, None, None, layout=layout, tok0=tile_tok0,
                         num_tokens=num_tokens, kv_head=kv_head, split=None)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config"))
def ragged_prefill_attention(
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
    config: PrefillAttentionConfig | None = None,
):
    """Causal paged attention over a flat ragged token batch -> [T, Nq, D] in q's dtype (long prefills)."""
    rpa.check_shapes(q, k_cache, v_cache, seq_ids, positions, page_table, context_lens, query_start_loc)
    num_tok, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    if config is None:
        config = default_config(num_tok, num_q_heads, num_kv_heads, head_dim, page_size,
                                page_table.shape[1] * page_size, q.dtype, k_cache.dtype)
    max_pages = page_table.shape[1]
    error = config_error(config, head_dim, page_size, max_pages, k_cache.dtype.itemsize)
    if error is not None:
        raise ValueError(error)
    block_q = ROWS // rpa._padded_group(num_q_heads, num_kv_heads)
    layout = rpa.tile_layout(num_q_heads, num_kv_heads, block_q)
    if layout.head_major is None:
        raise ValueError(f"{num_q_heads=} / {num_kv_heads=}: a GQA group > 8 heads must be a multiple of 8")
    tile_tokens = COMPUTE_WGS * block_q
    num_q_blocks = pl.cdiv(num_tok, tile_tokens)
    padded = num_q_blocks * tile_tokens  # tokens the CTAs cover; q is padded only when T is not a multiple
    q_in = jnp.pad(q, ((0, padded - num_tok), (0, 0), (0, 0))) if padded != num_tok else q

    stages, block_kv = config.num_stages, config.block_kv
    copies = max(1, block_kv // page_size)
    pt_rows, pt_cols = rpa.page_table_tile(max_pages)
    tile = lambda dtype, *shape: plgpu.SMEM(shape, dtype, transforms=smem_transforms(shape[-1], dtype))
    mma_dtype = rpa.compute_dtype(q.dtype, k_cache.dtype)
    narrow = rpa.is_narrow(q.dtype, k_cache.dtype)  # the TMA warpgroup converts each fp8 block into the mma_dtype ring
    nstages = config.narrow_stages
    scratch = (
        tile(q.dtype, COMPUTE_WGS, ROWS, head_dim),
        tile(mma_dtype, stages, block_kv, head_dim),
        tile(mma_dtype, stages, block_kv, head_dim),
        tile(mma_dtype, COMPUTE_WGS, ROWS, block_kv) if interpreting() else None,
        tile(mma_dtype, COMPUTE_WGS, ROWS, head_dim) if mma_dtype != q.dtype else None,
        plgpu.SMEM((pt_rows, pt_cols), jnp.int32),
        plgpu.Barrier(num_arrivals=layout.num_copies, num_barriers=COMPUTE_WGS),  # Q copies
        plgpu.Barrier(num_barriers=1),
        # K / V full: the TMA copies', or the TMA warpgroup's one arrival per converted block
        plgpu.Barrier(num_arrivals=1 if narrow else copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1 if narrow else copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        # the fp8 K / V rings and their TMA barriers
        *((tile(k_cache.dtype, nstages, block_kv, head_dim), tile(k_cache.dtype, nstages, block_kv, head_dim),
           plgpu.Barrier(num_arrivals=copies, num_barriers=nstages),
           plgpu.Barrier(num_arrivals=copies, num_barriers=nstages)) if narrow else (None,) * 4),
    )
    kernel = plgpu.kernel(
        functools.partial(_prefill_kernel, config=config, layout=layout, num_q_blocks=num_q_blocks, sm_scale=sm_scale,
                          max_pages=max_pages),
        out_type=jax.ShapeDtypeStruct((padded, num_q_heads, head_dim), q.dtype),
        scratch_types=(scratch,),
        grid=(num_q_blocks, num_kv_heads),
        grid_names=("q_block", "kv_head"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not config.auto_barriers),
    )
    out = kernel(*rpa.kernel_metadata(layer, num_tokens, seq_ids, positions, query_start_loc, page_table, padded),
                 q_in, k_cache, v_cache)
    return out[:num_tok] if padded != num_tok else out
