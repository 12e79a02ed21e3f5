"""Warp-specialized ragged prefill attention vs the float32 reference (interpreter on CPU, compiled on GPU),
its register-P GPU path lowered for CUDA on CPU, and its argument checks.

Freshly drawn random Q/K/V and page orders for every case; the interpreter NaN-fills every buffer it
allocates, so an unwritten output row fails ``assert_close``, and the Q of padding tokens is NaN (their
outputs must still be zeros, and no other row may see them). Both Q tile row orders are covered:
token-major (G % 8 == 0) and head-major (G_pad <= 8), with T a multiple of a CTA's tokens or not.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_prefill_attention as rpf
from tests.kernels.conftest import assert_close
from tests.kernels.test_fp8_kv_cache_attention import FP8, fp8_case
from tests.kernels.test_ragged_paged_attention import make_case

Config = rpf.PrefillAttentionConfig


def check(args, config, kernel_context, what):
    head_dim = args[0].shape[-1]
    with kernel_context():
        out = rpf.ragged_prefill_attention(*args, sm_scale=head_dim ** -0.5, config=config)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=head_dim ** -0.5), what=what)
    return out


CASES = {
    # name: (seq_lens_before, query_lens, (Nq, Nkv), head_dim, page_size, token_bucket, max_pages, config)
    # 256 tokens, 32 per CTA: unmasked blocks below the diagonal, two masked at it.
    "long_prefill_g4_d128": ([0], [256], (8, 2), 128, 16, 256, 16, Config(block_kv=128, num_stages=2)),
    # GLM-4 heads (32 q / 2 kv): 4 tokens per compute warpgroup, 8 per CTA.
    "long_prefill_glm4": ([0], [80], (32, 2), 128, 16, 80, 5, Config(block_kv=64, num_stages=3)),
    # Chunked prefill on a 150-token prefix; pages of 64, a 3-deep ring, no ping-pong barrier.
    "chunk_on_prefix_g8_d64": ([150], [70], (16, 2), 64, 64, 72, 4,
                               Config(block_kv=64, num_stages=3, schedule_barrier=False)),
    # Four sequences (two with prefixes), boundaries inside tiles, 6 padding tokens; group 16.
    "four_sequences_g16": ([0, 37, 5, 0], [23, 41, 9, 30], (16, 1), 64, 16, 109, 6, Config(block_kv=128, num_stages=2)),
    # Pages larger than a K/V block (a block is a slice of one page).
    "page128_block64": ([60, 0], [50, 70], (4, 1), 128, 128, 120, 2, Config(block_kv=64, num_stages=2)),
    # Two decode-like tokens in one warpgroup tile: the other warpgroup only walks (skips) their blocks.
    "single_tokens_skip": ([3, 200], [1, 1], (4, 2), 64, 16, 8, 14, Config(block_kv=64, num_stages=2)),
    # Only padding: every CTA has an empty schedule.
    "no_tokens": ([5], [0], (4, 2), 64, 16, 16, 1, Config(block_kv=64, num_stages=2)),
    # GLM-4 heads, 21 tokens (not a multiple of the CTA's 8: q padded to 24), 2 of them padding.
    "glm4_tokens_not_tile_multiple": ([0, 9], [13, 6], (32, 2), 64, 16, 21, 2, Config(block_kv=64, num_stages=2)),
    # Group 6 (padded to 8; head-major, pad-head rows never loaded), 30 tokens of which 3 padding (CTA: 16).
    "group6_head_major": ([4], [27], (12, 2), 64, 16, 30, 3, Config(block_kv=64, num_stages=2)),
    # Group 24 (padded to 32; token-major [24, D] copies), 2 tokens a warpgroup, 11 tokens (CTA: 4).
    "group24_token_major": ([0], [10], (48, 2), 64, 16, 11, 1, Config(block_kv=64, num_stages=2)),
}
# four_sequences_g16 with auto barriers off (several sequences a CTA: the page-table row reloaded between them)
CASES["four_sequences_g16_no_auto_barriers"] = (*CASES["four_sequences_g16"][:-1],
                                                dataclasses.replace(CASES["four_sequences_g16"][-1], auto_barriers=False))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, kernel_context):
    before, new, (num_q_heads, num_kv_heads), head_dim, page_size, bucket, max_pages, config = CASES[case]
    args = make_case(before, new, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     page_size=page_size, token_bucket=bucket, max_pages=max_pages, seed=zlib.crc32(case.encode()))
    total = sum(new)
    args = (args[0].at[total:].set(jnp.nan), *args[1:])  # padding tokens' Q poisoned
    out = check(args, config, kernel_context, case)
    assert np.all(np.asarray(out[total:], np.float32) == 0.0), "padding tokens must give zeros"


def test_odd_group_default_config(kernel_context):
    """SmolLM2-like 9 q / 3 kv heads (group 3, padded to 4), float16, config from the heuristic."""
    args = make_case([10, 0], [40, 20], num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16,
                     token_bucket=64, max_pages=4, seed=5, dtype=jnp.float16)
    check(args, None, kernel_context, "group 3 f16 default config")


def test_wide_page_table(kernel_context):
    """A page table of 320 columns (> 256: its SMEM copy is tiled [2, 256]) with pages past column 256 in use
    (18% of the first token's keys); the CTA's two sequences each copy their row into SMEM in turn."""
    args = make_case([5000, 37], [1, 1], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                     token_bucket=2, max_pages=320, seed=9, num_layers=1)
    check(args, Config(block_kv=128, num_stages=2), kernel_context, "320 pages")


def _abstract_args(num_tokens, num_q_heads, num_kv_heads, head_dim, page_size, max_pages=None, dtype=jnp.bfloat16):
    max_pages = max_pages or -(-num_tokens // page_size)
    cache = jax.ShapeDtypeStruct((1, max_pages + 1, page_size, num_kv_heads, head_dim), dtype)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    return (jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), dtype), cache, cache, ints(),
            ints(num_tokens), ints(num_tokens), ints(1, max_pages), ints(1), ints(2), ints())


@pytest.mark.parametrize("num_tokens,heads,head_dim,page_size,max_pages,config", [
    (4096, (32, 2), 128, 16, None, None),                                 # GLM-4, default config
    (4096, (32, 2), 128, 16, 1024, Config(block_kv=128, num_stages=2, schedule_barrier=False)),
    (4096, (32, 2), 128, 16, None, Config(block_kv=128, num_stages=2, auto_barriers=False)),
    (1024, (8, 2), 64, 64, None, Config(block_kv=64, num_stages=4)),
    (512, (4, 1), 256, 256, None, None),                                  # block of a page, head dim 256
    (4100, (32, 2), 128, 16, None, None),                # GLM-4, T not a multiple of the CTA's 8 tokens
    (2048, (28, 4), 128, 16, None, None),                # Qwen2-7B: group 7 (padded to 8), head-major
])
def test_register_p_path_lowers_for_cuda(num_tokens, heads, head_dim, page_size, max_pages, config):
    """Outside the interpreter P is the register A operand of the PV wgmma (accumulated in place):
    Mosaic GPU's lowering (run here, on CPU) must take it, the page-table row's copy into SMEM for a
    1024-column table (tiled [4, 256]: one async copy takes at most 256 elements a dimension), and the Q / O
    TMA copies of both tile row orders (token-major G 16, head-major G 4 and 7 with pad heads, q padded)."""
    args = _abstract_args(num_tokens, *heads, head_dim, page_size, max_pages)
    traced = rpf.ragged_prefill_attention.trace(*args, sm_scale=head_dim ** -0.5, config=config)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_config_and_supports():
    assert rpf.supports(32, 2, 128, jnp.bfloat16, 16)
    assert rpf.supports(9, 3, 64, jnp.bfloat16, 16) and rpf.supports(48, 2, 128, jnp.bfloat16, 16)  # G 3, G 24
    assert not rpf.supports(24, 2, 128, jnp.bfloat16, 16)  # G 12: neither Q tile row order fits 8-row tiles
    assert rpf.supports(4, 1, 256, jnp.float16, 256)
    assert not rpf.supports(32, 2, 512, jnp.bfloat16, 16)  # Q tiles + 2 K/V stages exceed SMEM
    assert not rpf.supports(32, 2, 128, jnp.float32, 16)
    config = rpf.default_config(4096, 32, 2, 128, 16, 4096, jnp.bfloat16)
    assert rpf.config_error(config, 128, 16) is None and config.block_kv == 128
    assert rpf.default_config(512, 4, 1, 128, 192, 1024, jnp.bfloat16).block_kv == 64  # 192-row pages
    # Q tiles + K/V ring + the page-table row; a third 128-row stage does not fit at D 128.
    assert rpf.smem_bytes(Config(block_kv=128, num_stages=2), 128, max_pages=1000) == 32768 + 131072 + 4 * 4 * 256
    assert "bytes of SMEM" in rpf.config_error(Config(block_kv=128, num_stages=3), 128, 16)
    assert "65536 pages" in rpf.config_error(config, 128, 16, max_pages=65537)


def test_rejects_bad_arguments():
    args = list(make_case([0], [8], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                          token_bucket=8, max_pages=1, seed=1))
    q = args[0]
    with pytest.raises(ValueError, match="block_kv"):
        Config(block_kv=96)
    with pytest.raises(ValueError, match="num_stages"):
        Config(num_stages=1)
    with pytest.raises(ValueError, match="must divide num_q_heads"):  # the shape checks shared with rpa
        rpf.ragged_prefill_attention(jnp.zeros((8, 5, 64), q.dtype), *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        rpf.ragged_prefill_attention(q.astype(jnp.float32), *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="q must be"):
        rpf.ragged_prefill_attention(q[0], *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="bytes of SMEM"):
        rpf.ragged_prefill_attention(jnp.zeros((8, 4, 256), q.dtype), jnp.zeros((1, 2, 16, 2, 256), q.dtype),
                                     jnp.zeros((1, 2, 16, 2, 256), q.dtype), *args[3:], sm_scale=1.0,
                                     config=Config(block_kv=128, num_stages=3))
    with pytest.raises(ValueError, match="at most 65536 pages"):
        rpf.ragged_prefill_attention(*args[:6], jnp.zeros((1, 65537), jnp.int32), *args[7:], sm_scale=1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        rpf.ragged_prefill_attention(jnp.zeros((8, 24, 64), q.dtype), *args[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="must divide one another"):
        k = jnp.zeros((1, 2, 48, 2, 64), q.dtype)
        rpf.ragged_prefill_attention(q, k, k, *args[3:], sm_scale=1.0, config=Config(block_kv=128))


@pytest.mark.gpu
@pytest.mark.parametrize("before,new,bucket", [([0], [2048], 2048), ([0, 700], [1000, 1048], 2048),
                                               ([0, 700], [1000, 1043], 2053)])  # 2053: q padded, 10 padding
def test_glm4_prefill_2k_gpu(before, new, bucket):
    """GLM-4 heads, page 16, default config: one 2k prefill; a 1000-token prefill beside a chunk on a prefix."""
    args = make_case(before, new, num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                     token_bucket=bucket, max_pages=(max(before) + 2048) // 16, seed=21, num_layers=1)
    out = rpf.ragged_prefill_attention(*args, sm_scale=128 ** -0.5)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5), what=f"prefill {new}")


@pytest.mark.gpu
@pytest.mark.parametrize("auto_barriers", [True, False])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, FP8])
def test_glm4_mixed_step_gpu(auto_barriers, kv_dtype):
    """GLM-4 heads, page 16: an engine-like mixed step -- 120 single decode tokens at 1-1,500 tokens of
    context (up to 8 sequences a CTA: its TMA warpgroup reloads the page-table row in SMEM between them)
    beside two prefill chunks -- with Pallas' automatic barriers on and off (off: only the kernel's own
    ``commit_smem`` keeps the row's reload behind every thread's reads of the previous row). Repeated on
    fresh inputs: a race shows as a wrong page read now and then, not every time."""
    rng = np.random.default_rng(23)
    for seed in range(3):
        before = [int(b) for b in rng.integers(1, 1500, 120)] + [0, 900]
        new = [1] * 120 + [700, 500]
        bucket = sum(new) + 8  # 8 padding tokens
        args = (fp8_case if kv_dtype == FP8 else make_case)(
            before, new, num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16, token_bucket=bucket,
            max_pages=(max(b + n for b, n in zip(before, new)) + 15) // 16, seed=30 + seed, num_layers=1)
        config = dataclasses.replace(rpf.default_config(bucket, 32, 2, 128, 16, args[6].shape[1] * 16, jnp.bfloat16,
                                                        kv_dtype), auto_barriers=auto_barriers)
        out = rpf.ragged_prefill_attention(*args, sm_scale=128 ** -0.5, config=config)
        ref = rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5)
        assert_close(out, ref, what=f"seed {seed}, {jnp.dtype(kv_dtype).name} cache")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (9, 3)])
def test_head_major_prefill_1k_gpu(heads):
    """Llama-family groups (4, 7, 3: head-major Q tiles), a 1000-token prefill beside a chunk on a prefix."""
    args = make_case([0, 300], [500, 500], num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=64, page_size=16,
                     token_bucket=1024, max_pages=50, seed=22, num_layers=1)
    out = rpf.ragged_prefill_attention(*args, sm_scale=64 ** -0.5)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=64 ** -0.5), what=f"heads {heads}")
