"""Both ragged attention kernels reading an fp8 (e4m3) KV cache, vs the float32 reference.

The cache holds float8_e4m3fn pages (``kv_cache_dtype="fp8"``); the kernels convert each K / V block to
float16 in SMEM before its wgmma (the paged kernel's computing warpgroups each their own blocks, the prefill
kernel's TMA warpgroup once for both compute warpgroups). The reference reads the same fp8 values (exactly
representable in f32), so the kernel's error is f16 / bf16 rounding alone and the bf16 tolerance applies. Fresh
random inputs per case; padding tokens' Q is NaN and must give zeros (``check``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_prefill_attention as rpf
from tests.kernels.conftest import assert_close
from tests.kernels.test_ragged_paged_attention import WS_DECODE_BEFORE, check, make_case, poison_padding

FP8 = jnp.float8_e4m3fn


def fp8_case(before, new, **kwargs):
    """make_case's bf16 case with its K/V pages rounded to e4m3 (values ~N(0, 1): inside e4m3's range)."""
    q, k, v, *rest = make_case(before, new, **kwargs)
    return (q, k.astype(FP8), v.astype(FP8), *rest)


@pytest.mark.parametrize("heads,config", [
    ((16, 2), rpa.AttentionConfig(block_kv=64, num_stages=2)),
    ((4, 4), rpa.AttentionConfig(block_kv=128, num_stages=2, num_kv_splits=2)),
])
def test_mixed_steps_one_warpgroup(heads, config, kernel_context):
    """Prefill chunks and decode tokens in one step (the one-warpgroup kernel), token-major and head-major tiles."""
    args = fp8_case([20, 0, 70, 3], [9, 1, 13, 1], num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=128,
                    page_size=16, token_bucket=28, max_pages=7, seed=heads[0] * 7 + config.block_kv)
    assert args[1].dtype == FP8
    check(args, config, kernel_context, f"fp8 mixed heads={heads}")


@pytest.mark.parametrize("consumers,stages,splits,block_kv", [(1, 3, 1, 128), (2, 2, 2, 64), (1, 4, 2, 64)])
def test_warp_specialized_decode(consumers, stages, splits, block_kv, kernel_context):
    """Decode steps (TMA producer + 1 or 2 consumers, split-K): contexts of 1 key, whole blocks, ragged ends."""
    args = fp8_case(WS_DECODE_BEFORE, [1] * len(WS_DECODE_BEFORE), num_q_heads=32, num_kv_heads=2, head_dim=128,
                    page_size=16, token_bucket=8, max_pages=14, seed=consumers * 100 + stages * 10 + splits)
    config = rpa.AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits, block_q=1,
                                 consumer_warpgroups=consumers)
    check(args, config, kernel_context, f"fp8 decode {config}", decode_only=True)


@pytest.mark.parametrize("heads", [(32, 2), (8, 2)])
def test_prefill_kernel(heads, kernel_context):
    """The warp-specialized prefill kernel (the TMA warpgroup converting each block once for both compute
    warpgroups) on a long chunk over a prefix and a second sequence, with the default (fp8) config."""
    num_q_heads, num_kv_heads = heads
    args = poison_padding(fp8_case([40, 0], [90, 30], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                   head_dim=128, page_size=16, token_bucket=128, max_pages=9, seed=num_q_heads))
    with kernel_context():
        out = rpf.ragged_prefill_attention(*args, sm_scale=128 ** -0.5)
    ref = rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5)
    assert_close(out, ref, what=f"fp8 prefill heads={heads}")
    assert np.all(np.asarray(out[int(args[-1]):], np.float32) == 0.0)


def test_narrow_cache_configs_fit_and_look_up_their_own_tuning():
    """fp8 pages: the paged kernel takes half the K/V ring's SMEM plus converted K / V (and f16 Q) tiles per
    computing warpgroup; the prefill kernel adds an fp8 ring and the f16 Q tiles to a converted ring of bf16's
    size; the defaults fit."""
    bf16 = rpa.AttentionConfig(block_kv=128, num_stages=3, block_q=1, consumer_warpgroups=1)
    converted = (128 + 64 * (rpa.NARROW_COMPUTE == "f16")) * 128 * 2
    assert (rpa.smem_bytes(bf16, 128, p_via_smem=False, kv_itemsize=1)
            == rpa.smem_bytes(bf16, 128, p_via_smem=False) - 3 * 128 * 128 * 2 + converted)
    q16 = 64 * 128 * 2 * (rpa.NARROW_COMPUTE == "f16")
    two_stages = rpf.PrefillAttentionConfig(block_kv=64, num_stages=2, narrow_stages=3)
    assert (rpf.smem_bytes(two_stages, 128, kv_itemsize=1)
            == rpf.smem_bytes(two_stages, 128) + 2 * 3 * 64 * 128 + 2 * q16)
    for decode in (False, True):
        config = rpa.default_config(64, 32, 2, 128, 16, 4096, jnp.bfloat16, decode=decode, cache_dtype=FP8)
        assert rpa.smem_bytes(config, 128, max_pages=256, kv_itemsize=1) <= rpa.SMEM_BUDGET
    # fp8 decode: two consumers on 64-row blocks (the conversions overlap; H100, RESULTS "Session 14"), unless the
    # page size does not divide 64
    config = rpa.default_config(64, 32, 2, 128, 16, 4096, jnp.bfloat16, decode=True, cache_dtype=FP8)
    assert (config.consumer_warpgroups, config.block_kv, config.num_stages) == (2, 64, 4)
    assert rpa.default_config(64, 32, 2, 128, 128, 4096, jnp.bfloat16, decode=True, cache_dtype=FP8).block_kv == 128
    assert rpa.compute_dtype(jnp.bfloat16, FP8) == jnp.float16 and rpa.compute_dtype(jnp.bfloat16, jnp.bfloat16) == jnp.bfloat16
    # fp8 prefill: 64-row blocks, three f16 stages fed by a 3-deep fp8 ring (H100, RESULTS "Session 15")
    prefill = rpf.default_config(2048, 32, 2, 128, 16, 4096, jnp.bfloat16, FP8)
    assert prefill == rpf.PrefillAttentionConfig(block_kv=64, num_stages=3, narrow_stages=3)
    assert rpf.config_error(prefill, 128, 16, 256, kv_itemsize=1) is None
    assert rpf.smem_bytes(prefill, 128, max_pages=256, kv_itemsize=1) > rpf.smem_bytes(prefill, 128, max_pages=256) / 2
    assert rpa.supports(32, 2, 128, jnp.bfloat16, 16, FP8) and rpf.supports(32, 2, 128, jnp.bfloat16, 16, FP8)
    assert not rpa.supports(32, 2, 128, jnp.bfloat16, 16, jnp.int8)  # no int8 pages (no scales to read them by)


def test_register_splits_fit_the_launch_allocation():
    """setmaxnreg moves registers between the warpgroups of a CTA launched with 168 a thread (three warpgroups):
    a split that sums past 3 x 168 makes the increasing warpgroups wait forever (a hang on the GPU, not an error)."""
    budget = 3 * rpf.LAUNCH_REGISTERS_3WG
    assert budget == 504
    for consumer, producer in ((rpa._CONSUMER_REGISTERS, rpa._PRODUCER_REGISTERS),
                               (rpf._COMPUTE_REGISTERS, rpf._TMA_REGISTERS),
                               (rpf._NARROW_COMPUTE_REGISTERS, rpf._NARROW_TMA_REGISTERS)):
        assert 2 * consumer + producer <= budget and consumer % 8 == 0 and producer % 8 == 0


def test_rejects_mixed_or_narrow_query_dtypes():
    args = list(fp8_case([0], [2], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, token_bucket=4,
                         max_pages=1, seed=3))
    q, k, v = args[:3]
    with pytest.raises(ValueError, match="float8_e4m3fn"):  # K and V in different dtypes
        rpa.ragged_paged_attention(q, k, v.astype(jnp.bfloat16), *args[3:], sm_scale=1.0)
    with pytest.raises(ValueError, match="bfloat16 or float16"):  # fp8 queries
        rpa.ragged_paged_attention(q.astype(FP8), k, v, *args[3:], sm_scale=1.0)
    with pytest.raises(ValueError, match="float8_e4m3fn"):  # int8 pages
        rpa.ragged_paged_attention(q, k.astype(jnp.int8), v.astype(jnp.int8), *args[3:], sm_scale=1.0)


@pytest.mark.parametrize("tokens,num_seqs,kernel", [(64, 64, "decode"), (8, 8, "decode2"), (2048, 64, "prefill"),
                                                     (100, 4, "mixed")])
def test_register_paths_lower_for_cuda(tokens, num_seqs, kernel):
    """Outside the interpreter the converted tile is stored from registers into a swizzled SMEM tile and P is
    the PV wgmma's register operand; Mosaic GPU's lowering (run here, on CPU) must take both at GLM-4 shapes."""
    args = (jax.ShapeDtypeStruct((tokens, 32, 128), jnp.bfloat16),
            *[jax.ShapeDtypeStruct((1, 2048, 16, 2, 128), FP8)] * 2,
            jax.ShapeDtypeStruct((), jnp.int32), *[jax.ShapeDtypeStruct((tokens,), jnp.int32)] * 2,
            jax.ShapeDtypeStruct((num_seqs, 256), jnp.int32), jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    if kernel == "prefill":
        traced = rpf.ragged_prefill_attention.trace(*args, sm_scale=128 ** -0.5)
    else:
        config = (rpa.AttentionConfig(block_kv=64, num_stages=4, num_kv_splits=8, block_q=1, consumer_warpgroups=2)
                  if kernel == "decode2" else None)
        traced = rpa.ragged_paged_attention.trace(*args, sm_scale=128 ** -0.5, decode_only=kernel.startswith("decode"),
                                                  config=config)
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [True, False])
def test_glm4_batch64_long_context(decode):
    """64 sequences x 3-4k context with GLM-4 heads, default configs: a decode step, and a 1k prefill chunk."""
    lens = np.random.default_rng(2).integers(3000, 4096, 64)
    if decode:
        args = fp8_case(lens - 1, np.ones(64, np.int64), num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                        token_bucket=64, max_pages=256, seed=21, num_layers=1)
        out = rpa.ragged_paged_attention(*args, sm_scale=128 ** -0.5, decode_only=True)
    else:
        args = fp8_case([3000], [1024], num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                        token_bucket=1024, max_pages=256, seed=22, num_layers=1)
        out = rpf.ragged_prefill_attention(*args, sm_scale=128 ** -0.5)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5), what=f"fp8 decode={decode}")
