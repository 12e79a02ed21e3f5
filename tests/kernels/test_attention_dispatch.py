"""The model's Pallas attention dispatch: decode-only steps, prefill-sized buckets and small mixed steps
each reach their kernel, and all three equal the plain-XLA attention (interpreter on CPU)."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest

from autoglm_jax.model import attention
from autoglm_jax.model.attention_metadata import AttentionMetadata
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_prefill_attention as rpf
from tests.kernels.conftest import assert_close
from tests.kernels.test_ragged_paged_attention import make_case


@pytest.mark.parametrize("case", ["decode_only", "prefill_bucket", "small_mixed"])
def test_dispatch_reaches_its_kernel_and_matches_xla(case, kernel_context):
    before, new, bucket, decode_only = {
        "decode_only": ([40, 7, 90], [1, 1, 1], 3, True),
        "prefill_bucket": ([30, 0], [1, 470], attention.PREFILL_KERNEL_MIN_TOKENS, False),
        "small_mixed": ([30, 0], [1, 20], 24, False),
    }[case]
    q, k_cache, v_cache, layer, seq_ids, positions, page_table, context_lens, qsl, num_tokens = make_case(
        before, new, num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, token_bucket=bucket,
        max_pages=34, seed=len(case), num_layers=1)
    md = AttentionMetadata(seq_ids=seq_ids, positions=positions, slot_mapping=positions * 0, page_table=page_table,
                           context_lens=context_lens, query_start_loc=qsl, num_tokens=num_tokens)
    md = dataclasses.replace(md, decode_only=decode_only)
    spies = {name: mock.patch.object(module, name, wraps=getattr(module, name))
             for module, name in ((rpa, "ragged_paged_attention"), (rpf, "ragged_prefill_attention"))}
    with kernel_context(), spies["ragged_paged_attention"] as paged, spies["ragged_prefill_attention"] as prefill:
        out = attention.paged_attention_pallas(q, k_cache, v_cache, layer, md, sm_scale=0.125)
    expected = "ragged_prefill_attention" if case == "prefill_bucket" else "ragged_paged_attention"
    assert (prefill.call_count, paged.call_count) == ((1, 0) if expected == "ragged_prefill_attention" else (0, 1))
    if case == "decode_only":
        assert paged.call_args.kwargs["decode_only"] is True
    ref = attention.paged_attention_xla(q, k_cache, v_cache, layer, md, sm_scale=0.125)
    n = int(num_tokens)
    assert_close(out[:n], ref[:n], what=case)
