"""The attention_backend rule ("auto" picks the Pallas kernel only on GPU and only for shapes it takes) and the KV write."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.attention import resolve_attention_backend, write_kv
from pallas_kernels.ragged_paged_attention import supports


def test_kernel_shape_support():
    assert supports(32, 2, 128, jnp.bfloat16, 16)       # GLM-4-9B
    assert supports(9, 3, 64, jnp.bfloat16, 16)         # SmolLM2
    assert not supports(4, 2, 16, jnp.bfloat16, 16)     # head_dim not a multiple of 64
    assert not supports(32, 2, 128, jnp.float32, 16)    # f32 has no wgmma path here
    assert not supports(128, 1, 128, jnp.bfloat16, 16)  # GQA group 128 > 64 rows
    assert not supports(32, 2, 128, jnp.bfloat16, 12)   # page size not a multiple of 8


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_is_xla_off_gpu_and_explicit_choices_stand():
    config = ModelConfig.from_preset("glm-4-9b-0414")
    assert resolve_attention_backend("auto", config, jnp.bfloat16, 16) == "xla"
    assert resolve_attention_backend("pallas", config, jnp.bfloat16, 16) == "pallas"
    assert resolve_attention_backend("xla", config, jnp.bfloat16, 16) == "xla"


def test_auto_asks_the_kernel_about_the_cache_dtype(monkeypatch):
    """On a GPU "auto" passes the KV cache's dtype to the kernel's ``supports``: an fp8 cache of a bf16 model
    takes the kernel, a cache of a dtype it does not read (float32 under bf16 queries) falls back to XLA."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = ModelConfig.from_preset("glm-4-9b-0414")
    assert resolve_attention_backend("auto", config, jnp.bfloat16, 16) == "pallas"
    assert resolve_attention_backend("auto", config, jnp.bfloat16, 16, jnp.float8_e4m3fn) == "pallas"
    assert resolve_attention_backend("auto", config, jnp.bfloat16, 16, jnp.float32) == "xla"


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_write_kv_matches_a_scatter(num_tokens):
    """One token goes through dynamic_update_slice, several through the scatter: both equal a plain
    indexed set, the other layers and slots untouched (fresh random cache, random in-bounds slots)."""
    rng = np.random.default_rng(num_tokens)
    shape = (3, 5, 4, 2, 8)  # [L, P, page_size, Nkv, D]
    k_cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    k_new = jnp.asarray(rng.standard_normal((num_tokens, 2, 8)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((num_tokens, 2, 8)), jnp.float32)
    slots = jnp.asarray(rng.choice(5 * 4, num_tokens, replace=False), jnp.int32)
    layer = jnp.int32(rng.integers(3))
    k, v = jax.jit(write_kv)(k_cache, v_cache, layer, slots, k_new, v_new)
    pages, rows = np.asarray(slots) // 4, np.asarray(slots) % 4
    want_k = np.asarray(k_cache).copy()
    want_v = np.asarray(v_cache).copy()
    want_k[int(layer), pages, rows] = np.asarray(k_new.astype(jnp.bfloat16))
    want_v[int(layer), pages, rows] = np.asarray(v_new.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(k), want_k)
    np.testing.assert_array_equal(np.asarray(v), want_v)


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_write_kv_saturates_into_a_float8_cache(num_tokens):
    """Into float8 e4m3fn (largest finite 448, no infinity: a plain cast of 1000 is NaN) values beyond
    +-448 are stored as +-448, in-range ones as their nearest e4m3 value; one token (dynamic_update_slice)
    and several (the scatter) alike."""
    rng = np.random.default_rng(num_tokens)
    shape = (2, 3, 4, 2, 8)  # [L, P, page_size, Nkv, D]
    k_cache = jnp.zeros(shape, jnp.float8_e4m3fn)
    v_cache = jnp.zeros(shape, jnp.float8_e4m3fn)
    k_new = rng.standard_normal((num_tokens, 2, 8)).astype(np.float32)
    k_new[:, 0, :3] = [1000.0, -1e6, 449.0]
    v_new = -k_new
    slots = jnp.asarray(rng.choice(3 * 4, num_tokens, replace=False), jnp.int32)
    k, v = jax.jit(write_kv)(k_cache, v_cache, jnp.int32(1), slots, jnp.asarray(k_new), jnp.asarray(v_new))
    assert k.dtype == v.dtype == jnp.float8_e4m3fn
    pages, rows = np.asarray(slots) // 4, np.asarray(slots) % 4
    stored_k = np.asarray(k.astype(jnp.float32))[1, pages, rows]
    stored_v = np.asarray(v.astype(jnp.float32))[1, pages, rows]
    want_k = np.asarray(jnp.asarray(np.clip(k_new, -448, 448)).astype(jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(stored_k[:, 0, :3], np.broadcast_to([448.0, -448.0, 448.0], (num_tokens, 3)))
    np.testing.assert_array_equal(stored_k, want_k)
    np.testing.assert_array_equal(stored_v, -want_k)
    assert not np.isnan(np.asarray(k.astype(jnp.float32))).any()
