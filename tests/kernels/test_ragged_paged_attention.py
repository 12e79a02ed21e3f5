"""Ragged paged attention vs its float32 reference (interpreter on CPU, compiled on GPU).

Freshly drawn random Q/K/V and page orders for every case; the interpreter NaN-fills every
buffer it allocates, so an unwritten output row fails ``assert_close``, and the Q of padding tokens is NaN
(their outputs must still be zeros, and no other row may see them). The three Q / O tile layouts are
covered: token-major (G % 8 == 0, incl. decode G 16 with 48 unused rows), head-major (G_pad <= 8, incl. pad
heads) and the XLA-packed fallback (G 12; G 1-4 with fewer than 8 tokens per CTA).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.model.attention_metadata import AttentionMetadata
from pallas_kernels import ragged_paged_attention as rpa
from tests.kernels.conftest import assert_close


def make_case(seq_lens_before, query_lens, *, num_q_heads, num_kv_heads, head_dim, page_size,
              token_bucket, max_pages, seed, num_layers=2, dtype=jnp.bfloat16):
    """Random cache with each sequence's pages in random, non-contiguous order (page 0 = scratch)."""
    rng = np.random.default_rng(seed)
    needed = [-(-(before + new) // page_size) for before, new in zip(seq_lens_before, query_lens)]
    num_pages = sum(needed) + 4
    order = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((len(query_lens), max_pages), np.int32)
    start = 0
    for row, count in enumerate(needed):
        page_table[row, :count] = order[start:start + count]
        start += count
    meta = AttentionMetadata.build(np.array(seq_lens_before), np.array(query_lens), page_table, page_size, token_bucket)
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
    k_cache = jax.random.normal(keys[0], shape, jnp.float32).astype(dtype)
    v_cache = jax.random.normal(keys[1], shape, jnp.float32).astype(dtype)
    q = jax.random.normal(keys[2], (token_bucket, num_q_heads, head_dim), jnp.float32).astype(dtype)
    layer = jnp.int32(rng.integers(num_layers))
    return (q, k_cache, v_cache, layer, meta.seq_ids, meta.positions, meta.page_table,
            meta.context_lens, meta.query_start_loc, meta.num_tokens)


def poison_padding(args):
    """args with the Q of padding tokens (>= num_tokens) NaN."""
    q, num_tokens = args[0], int(args[-1])
    return (q.at[num_tokens:].set(jnp.nan), *args[1:])


def check(args, config, kernel_context, what, decode_only=False):
    """Kernel (padding tokens' Q poisoned) vs the reference; padding tokens must give exact zeros."""
    head_dim, num_tokens = args[0].shape[-1], int(args[-1])
    args = poison_padding(args)
    with kernel_context():
        out = rpa.ragged_paged_attention(*args, sm_scale=head_dim ** -0.5, config=config, decode_only=decode_only)
    ref = rpa.ragged_paged_attention_reference(*args, sm_scale=head_dim ** -0.5)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert_close(out, ref, what=what)
    assert np.all(np.asarray(out[num_tokens:], np.float32) == 0.0), f"{what}: padding tokens must give zeros"


CASES = {
    # name: (seq_lens_before, query_lens, token_bucket, max_pages)
    "decode_only": ([37, 0, 120, 63, 5], [1, 1, 1, 1, 1], 8, 9),
    "single_long_prefill": ([0], [150], 152, 10),
    "mixed_mid_sequence_chunks": ([20, 0, 70, 3], [9, 1, 13, 1], 28, 6),
}


@pytest.mark.parametrize("case,heads,page_size", [
    ("decode_only", (4, 4), 16), ("decode_only", (16, 2), 32),
    ("single_long_prefill", (4, 2), 32), ("single_long_prefill", (16, 2), 16),
    ("mixed_mid_sequence_chunks", (4, 4), 32), ("mixed_mid_sequence_chunks", (8, 2), 16),
    ("mixed_mid_sequence_chunks", (16, 2), 16), ("mixed_mid_sequence_chunks", (24, 2), 16),
])
def test_matches_reference(case, heads, page_size, kernel_context):
    """Decode-only / long prefill / mixed batches; GQA ratios 1, 2, 4 (head-major), 8 (token-major), 12 (packed);
    pages 16 and 32. Mixed: 4 sequences in 28 tokens (not a multiple of block_q 16 / 8 / 4), several per CTA."""
    before, new, bucket, max_pages = CASES[case]
    num_q_heads, num_kv_heads = heads
    seed = zlib.crc32(f"{case}{heads}{page_size}".encode())
    args = make_case(before, new, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=64,
                     page_size=page_size, token_bucket=bucket, max_pages=max_pages * 16 // page_size + 1, seed=seed)
    config = rpa.AttentionConfig(block_kv=64, num_stages=2, num_kv_splits=1)
    check(args, config, kernel_context, f"{case} heads={heads} page={page_size}")


@pytest.mark.parametrize("splits,stages,block_kv", [(3, 2, 64), (2, 2, 128), (1, 1, 128)])
def test_glm4_heads_split_k(splits, stages, block_kv, kernel_context):
    """GLM-4 grouping (32 q / 2 kv heads, D=128) with split-K over the KV range."""
    args = make_case([200, 0, 31], [1, 6, 1], num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                     token_bucket=12, max_pages=14, seed=splits * 10 + stages)
    check(args, rpa.AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits),
          kernel_context, f"glm4 splits={splits}")


def test_odd_group_and_default_config(kernel_context):
    """SmolLM2-like 9 q / 3 kv heads (group 3, padded to 4); config from the heuristic."""
    args = make_case([10, 33], [4, 1], num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16,
                     token_bucket=6, max_pages=3, seed=7)
    check(args, None, kernel_context, "group3 default config")


@pytest.mark.parametrize("block_q,heads", [(1, (32, 2)), (2, (16, 2)), (1, (4, 4)), (8, (9, 3))])
def test_fewer_tokens_per_cta(block_q, heads, kernel_context):
    """block_q below the densest packing, split-K: a token's rows start every 64 // block_q rows (token-major
    G 16 / 8, packed G 1) or the heads' rows every block_q (head-major G 3: rows 24.. unused); with
    block_q = 1 every CTA streams a single sequence (the decode layout). Mixed chunks included, so a
    block of 2 tokens can straddle two sequences; 10 tokens are not a multiple of block_q 8."""
    num_q_heads, num_kv_heads = heads
    args = make_case([45, 0, 130, 7], [1, 5, 1, 2], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                     head_dim=64, page_size=16, token_bucket=10, max_pages=10, seed=block_q * 100 + num_q_heads)
    config = rpa.AttentionConfig(block_kv=64, num_stages=2, num_kv_splits=2, block_q=block_q)
    check(args, config, kernel_context, f"block_q={block_q} heads={heads}")


# Decode batch for the warp-specialized kernel: contexts 38, 1, 128 (two full 64-row blocks), 64, 201, 6 and
# 2 padding tokens; with 3 splits some splits (and the second consumer of a split) get no KV block.
WS_DECODE_BEFORE = [37, 0, 127, 63, 200, 5]


@pytest.mark.parametrize("consumers,stages,splits,block_kv,heads,page_size", [
    (1, 2, 1, 64, (16, 2), 16), (1, 3, 2, 128, (4, 2), 32), (2, 2, 1, 64, (32, 2), 32), (2, 4, 3, 64, (4, 4), 16),
    (1, 2, 2, 64, (32, 2), 16),
])
def test_warp_specialized_decode(consumers, stages, splits, block_kv, heads, page_size, kernel_context):
    """TMA producer warpgroup + 1 or 2 consumer warpgroups (alternate KV blocks, merged through SMEM), with
    split-K; contexts of 1 key, exact multiples of the block and ragged ends; padding tokens (NaN Q) give
    zeros. Q / O token-major in place (G 8, G 16: rows G.. of the tile unused) or packed (G 2, 1)."""
    num_q_heads, num_kv_heads = heads
    seed = zlib.crc32(f"ws{consumers}{stages}{splits}{block_kv}{heads}{page_size}".encode())
    args = make_case(WS_DECODE_BEFORE, [1] * len(WS_DECODE_BEFORE), num_q_heads=num_q_heads,
                     num_kv_heads=num_kv_heads, head_dim=64, page_size=page_size, token_bucket=8,
                     max_pages=-(-208 // page_size), seed=seed)
    config = rpa.AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits, block_q=1,
                                 consumer_warpgroups=consumers)
    check(args, config, kernel_context, f"{config} heads={heads}", decode_only=True)


def test_wide_page_table(kernel_context):
    """A page table of 300 columns (> 256: its SMEM copy is tiled [2, 256]) with pages past column 256 in use."""
    args = make_case([4200, 37], [1, 1], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                     token_bucket=2, max_pages=300, seed=9, num_layers=1)
    check(args, rpa.AttentionConfig(block_kv=128, num_stages=2, num_kv_splits=2, block_q=1), kernel_context, "300 pages")


def test_decode_steps_default_to_one_token_per_cta(kernel_context):
    """At most one token per sequence (a decode step) -> block_q = 1; a prefill chunk -> densest packing."""
    decode = rpa.default_config(64, 32, 2, 128, 16, 4096, jnp.bfloat16, decode=True)
    mixed = rpa.default_config(64, 32, 2, 128, 16, 4096, jnp.bfloat16)
    assert rpa.tokens_per_cta(decode, 32, 2) == 1 and rpa.tokens_per_cta(mixed, 32, 2) == 4
    assert decode.consumer_warpgroups >= 1 and mixed.consumer_warpgroups == 0  # warp-specialized decode only
    args = make_case([300, 17, 64], [1, 1, 1], num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                     token_bucket=3, max_pages=20, seed=5, num_layers=1)
    with kernel_context():
        out = rpa.ragged_paged_attention(*args, sm_scale=128 ** -0.5, decode_only=True)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5), what="decode default config")


WS_TWO_CONSUMERS = rpa.AttentionConfig(block_kv=128, num_stages=2, num_kv_splits=2, block_q=1, consumer_warpgroups=2)


@pytest.mark.parametrize("tokens,num_seqs,max_pages,config,heads", [
    (64, 64, 256, None, (32, 2)), (1, 1, 1024, None, (32, 2)), (2048, 64, 300, None, (32, 2)),
    (64, 64, 256, WS_TWO_CONSUMERS, (32, 2)),
    (8, 8, 300, rpa.AttentionConfig(block_kv=64, num_stages=4, num_kv_splits=8, block_q=1, consumer_warpgroups=2),
     (32, 2)),
    (100, 4, 64, None, (28, 4)),
])
def test_register_p_path_lowers_for_cuda(tokens, num_seqs, max_pages, config, heads):
    """Outside the interpreter P is the PV wgmma's register A operand (no SMEM tile); Mosaic GPU's layout
    inference and lowering (which run here, on CPU) must take it for the default decode / prefill configs,
    and the page-table row's copy into SMEM for wide tables (> 256 entries: tiled rows of 256); two consumer
    warpgroups add register budgets and the f32 merge tile's WGMMA-layout load. Q / O copies: token-major
    (GLM-4, G 16), head-major (Qwen2-7B, G 7: strided [8, D] copies, q padded to 104 tokens)."""
    num_q_heads, num_kv_heads = heads
    args = (jax.ShapeDtypeStruct((tokens, num_q_heads, 128), jnp.bfloat16),
            *[jax.ShapeDtypeStruct((1, 2048, 16, num_kv_heads, 128), jnp.bfloat16)] * 2,
            jax.ShapeDtypeStruct((), jnp.int32), *[jax.ShapeDtypeStruct((tokens,), jnp.int32)] * 2,
            jax.ShapeDtypeStruct((num_seqs, max_pages), jnp.int32), jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    traced = rpa.ragged_paged_attention.trace(*args, sm_scale=128 ** -0.5, decode_only=tokens <= num_seqs,
                                              config=config)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_rejects_bad_shapes():
    args = list(make_case([0], [2], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                          token_bucket=4, max_pages=1, seed=1))
    q = args[0]
    with pytest.raises(ValueError, match="must divide num_q_heads"):
        rpa.ragged_paged_attention(jnp.zeros((4, 5, 64), q.dtype), *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="head_dim"):
        rpa.ragged_paged_attention(q[..., :32], *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="must divide config.block_kv"):
        k = jnp.ones((2, 4, 48, 2, 64), q.dtype)
        rpa.ragged_paged_attention(q, k, k, *args[3:], sm_scale=1.0, config=rpa.AttentionConfig(block_kv=64))
    with pytest.raises(ValueError, match="block_kv"):
        rpa.AttentionConfig(block_kv=48)
    with pytest.raises(ValueError, match="power of two"):
        rpa.AttentionConfig(block_q=3)
    with pytest.raises(ValueError, match="exceed the 64-row tile"):
        big_group = make_case([0], [2], num_q_heads=64, num_kv_heads=2, head_dim=64, page_size=16,
                              token_bucket=4, max_pages=1, seed=1)
        rpa.ragged_paged_attention(*big_group, sm_scale=1.0, config=rpa.AttentionConfig(block_q=4))
    with pytest.raises(ValueError, match="bytes of SMEM"):
        rpa.ragged_paged_attention(*args, sm_scale=1.0, config=rpa.AttentionConfig(block_kv=256, num_stages=4))
    with pytest.raises(ValueError, match="dtype"):
        rpa.ragged_paged_attention(q.astype(jnp.float32), *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="needs block_q=1"):
        rpa.AttentionConfig(consumer_warpgroups=1)
    with pytest.raises(ValueError, match="multiple of self.consumer_warpgroups"):
        rpa.AttentionConfig(num_stages=3, block_q=1, consumer_warpgroups=2)
    with pytest.raises(ValueError, match="must be 0, 1 or 2"):
        rpa.AttentionConfig(block_q=1, consumer_warpgroups=3)


@pytest.mark.gpu
def test_glm4_decode_batch64_long_context():
    """Realistic decode: 64 sequences x ~4k context, GLM-4 heads, page 16, default (tuned) config."""
    lens = np.random.default_rng(0).integers(3000, 4096, 64)
    args = make_case(lens - 1, np.ones(64, np.int64), num_q_heads=32, num_kv_heads=2, head_dim=128,
                     page_size=16, token_bucket=64, max_pages=256, seed=11, num_layers=1)
    out = rpa.ragged_paged_attention(*args, sm_scale=128 ** -0.5)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5), what="decode 64x4k")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    None, WS_TWO_CONSUMERS, rpa.AttentionConfig(block_kv=128, num_stages=2, block_q=1, consumer_warpgroups=2),
    rpa.AttentionConfig(block_kv=64, num_stages=4, block_q=1, consumer_warpgroups=2),
    rpa.AttentionConfig(block_kv=128, num_stages=2, block_q=1)])
def test_glm4_decode_steps_batch64(config):
    """A decode step (decode_only) of 64 sequences x 3-4k context, GLM-4 heads: the decode default (warp-
    specialized), two consumer warpgroups with and without split-K, and the one-warpgroup kernel."""
    lens = np.random.default_rng(1).integers(3000, 4096, 64)
    args = make_case(lens - 1, np.ones(64, np.int64), num_q_heads=32, num_kv_heads=2, head_dim=128,
                     page_size=16, token_bucket=64, max_pages=256, seed=13, num_layers=1)
    out = rpa.ragged_paged_attention(*args, sm_scale=128 ** -0.5, config=config, decode_only=True)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5), what=f"decode {config}")


@pytest.mark.gpu
def test_glm4_prefill_1k():
    args = make_case([0], [1024], num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                     token_bucket=1024, max_pages=64, seed=12, num_layers=1)
    out = rpa.ragged_paged_attention(*args, sm_scale=128 ** -0.5)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5), what="prefill 1k")


@pytest.mark.parametrize("splits", [1, 3, rpa.UNROLLED_MERGE_MAX_SPLITS + 4])
def test_combine_splits_matches_log_sum_exp_merge(splits):
    """The split-K merge (elementwise terms up to UNROLLED_MERGE_MAX_SPLITS splits, reductions above) vs
    a float64 numpy merge, with empty splits (the kernel's lse for no KV block: MASK + log2(1e-30))."""
    num_q_heads, num_kv_heads, head_dim, num_tokens = 16, 2, 32, 3
    layout = rpa.tile_layout(num_q_heads, num_kv_heads, 1)  # decode, token-major (G 16)
    rows = num_tokens * layout.rows_per_token
    rng = np.random.default_rng(splits)
    out = rng.standard_normal((splits, num_kv_heads, rows, head_dim)).astype(np.float32)
    lse = (8 * rng.standard_normal((splits, num_kv_heads, rows))).astype(np.float32)
    empty = rng.random((splits, num_kv_heads, rows)) < 0.3
    empty[0] = False  # every row keeps one split with context
    lse = np.where(empty, np.float32(rpa._MASK_VALUE) + np.log2(np.float32(1e-30)), lse)
    got = np.asarray(rpa._combine_splits(jnp.asarray(out), jnp.asarray(lse), layout, num_tokens))
    w = np.exp2(lse.astype(np.float64) - lse.max(axis=0, keepdims=True))
    merged = (w[..., None] * out).sum(0) / w.sum(0)[..., None]  # [Nkv, rows, D], rows = (token, head in group)
    merged = merged.reshape(num_kv_heads, num_tokens, layout.rows_per_token, head_dim)[:, :, :layout.group]
    want = merged.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
