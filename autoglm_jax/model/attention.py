"""The attention dispatch point: write this step's K/V into the paged cache, then attend.

Owns: the cache write and the choice of attention implementation (``"xla"`` below, ``"pallas"`` from
``pallas_kernels``). It does not know which pages belong to whom: that arrives in AttentionMetadata.

Shapes: q [T, Nq, D]; k_new, v_new [T, Nkv, D]; cache k, v [L, P, page_size, Nkv, D].

Dtypes: the cache may be narrower than q (``kv_cache_dtype="fp8"``: float8 e4m3fn, no scales). Writes
saturate to the cache dtype's range (``to_cache_dtype``); reads convert to q's dtype before the einsums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from autoglm_jax.model.attention_metadata import AttentionMetadata

ATTENTION_BACKENDS = ("xla", "pallas")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def to_cache_dtype(x, dtype):
    """``x`` as ``dtype``; into a float8 dtype saturated to its finite range first (a plain cast of an
    out-of-range value gives NaN in e4m3fn, which has no infinity), as vLLM's fp8 KV cache writes."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        largest = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -largest, largest)
    return x.astype(dtype)


def write_kv(k_cache, v_cache, layer, slot_mapping, k_new, v_new):
    """Scatters k_new/v_new [T, Nkv, D] into layer ``layer`` at flat slots [T] (in place once donated).

    One token (batch-1 decode) is a ``dynamic_update_slice``: every slot is in bounds (padding tokens write
    into the scratch page 0), and a one-row scatter becomes, on XLA:GPU, a read of the old row, a select
    (the scatter's out-of-bounds test) and the update: two extra kernels per layer (RESULTS "Session 8").
    Values are converted by ``to_cache_dtype`` (saturated into a float8 cache)."""
    page_size = k_cache.shape[2]
    pages, rows = slot_mapping // page_size, slot_mapping % page_size
    k_new, v_new = to_cache_dtype(k_new, k_cache.dtype), to_cache_dtype(v_new, v_cache.dtype)
    if slot_mapping.shape[0] == 1:
        start = (jnp.asarray(layer, jnp.int32), pages[0], rows[0], jnp.int32(0), jnp.int32(0))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None, None], start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None, None], start)
        return k_cache, v_cache
    k_cache = k_cache.at[layer, pages, rows].set(k_new)
    v_cache = v_cache.at[layer, pages, rows].set(v_new)
    return k_cache, v_cache


def paged_attention_xla(q, k_cache, v_cache, layer, md: AttentionMetadata, sm_scale: float):
    """Plain-XLA ragged paged attention: each token gathers the pages of its own sequence.

    Token t attends to positions 0..positions[t] of sequence seq_ids[t] (causal by position). Memory is
    O(T * MP * page_size * Nkv * D): fine for CPU and as a reference; the Pallas kernel is the GPU path.
    The gathered K/V are converted to q's dtype (a float8 cache is read as q's dtype, scale 1.0).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    pages = md.page_table[md.seq_ids]  # [T, MP]
    context = pages.shape[1] * page_size
    k = k_cache[layer, pages].reshape(num_tokens, context, num_kv_heads, head_dim).astype(q.dtype)
    v = v_cache[layer, pages].reshape(num_tokens, context, num_kv_heads, head_dim).astype(q.dtype)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    scores = jnp.einsum("tkgd,tskd->tkgs", qg, k, preferred_element_type=jnp.float32, precision=precision)
    visible = jnp.arange(context)[None, :] <= md.positions[:, None]  # [T, S]
    scores = jnp.where(visible[:, None, None, :], scores * sm_scale, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, v, preferred_element_type=jnp.float32, precision=precision)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


# Token buckets from which a step that is not decode-only runs the warp-specialized prefill kernel (two
# compute warpgroups share each K/V block; H100: 1.05-1.07x cuDNN at a 4k-token prefill, 0.97-0.98x at 16k,
# 2x the one-warpgroup kernel on a 1k chunk over a 3k prefix). Smaller mixed buckets keep the one-warpgroup
# kernel (unmeasured there: mostly single decode tokens).
PREFILL_KERNEL_MIN_TOKENS = 512


def paged_attention_pallas(q, k_cache, v_cache, layer, md: AttentionMetadata, sm_scale: float):
    """Decode-only steps: one sequence per CTA (``ragged_paged_attention``); prefill-sized buckets: the
    warp-specialized ``ragged_prefill_attention``, the decode tokens riding along included (H100: 0.215 ms
    on the offline benchmark's 2,048-token step, vs 0.253 ms with them split off to the decode kernel and
    0.254 ms for the one-warpgroup kernel alone, RESULTS session 10); other mixed steps:
    ``ragged_paged_attention``."""
    from pallas_kernels import ragged_paged_attention as rpa
    from pallas_kernels import ragged_prefill_attention as rpf

    args = (q, k_cache, v_cache, layer, md.seq_ids, md.positions, md.page_table, md.context_lens,
            md.query_start_loc, md.num_tokens)
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    if (not md.decode_only and q.shape[0] >= PREFILL_KERNEL_MIN_TOKENS
            and rpf.supports(q.shape[1], num_kv_heads, q.shape[2], q.dtype, page_size, k_cache.dtype)):
        return rpf.ragged_prefill_attention(*args, sm_scale=sm_scale)
    return rpa.ragged_paged_attention(*args, sm_scale=sm_scale, decode_only=md.decode_only)


_IMPLEMENTATIONS = {"xla": paged_attention_xla, "pallas": paged_attention_pallas}


def resolve_attention_backend(setting: str, config, dtype, page_size: int, cache_dtype=None) -> str:
    """The engine arg ``attention_backend``: "auto" = the Pallas kernel on GPU when the model's heads,
    dtype, page size and KV cache dtype (``cache_dtype``; None = ``dtype``) fit it, else plain XLA;
    "xla" / "pallas" as given."""
    if setting != "auto":
        return setting
    if jax.default_backend() != "gpu":
        return "xla"
    from pallas_kernels.ragged_paged_attention import supports

    fits = supports(config.num_attention_heads, config.num_key_value_heads, config.head_dim, dtype, page_size,
                    cache_dtype)
    return "pallas" if fits else "xla"


def attention(backend: str, q, k_new, v_new, k_cache, v_cache, layer, md: AttentionMetadata, sm_scale: float):
    """Writes k_new/v_new for this step's tokens, then attends; returns (out [T, Nq, D], k_cache, v_cache)."""
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"attention_backend={backend!r}; choose one of {ATTENTION_BACKENDS}")
    k_cache, v_cache = write_kv(k_cache, v_cache, layer, md.slot_mapping, k_new, v_new)
    out = _IMPLEMENTATIONS[backend](q, k_cache, v_cache, layer, md, sm_scale)
    return out, k_cache, v_cache
