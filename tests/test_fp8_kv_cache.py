"""The engine arg ``kv_cache_dtype``: its validation and resolution, and the model over a float8 e4m3fn KV
cache (no scales) against the same model over a float32 cache, prefill then decode, on tiny GLM-4 and Llama."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.checkpoint.loader import build_model
from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.model.kv_cache import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from tests.model_runner import forward, new_cache

# ||fp8 - f32|| / ||f32|| of the logits below, measured 0.032 (tiny-glm4) and 0.015 (tiny-llama): e4m3 keeps
# 3 mantissa bits. Keys alone read back wrongly (their bits as int8 / 64) measured 0.12; NaN fails isfinite.
MAX_RELATIVE_ERROR = 0.06


def test_unknown_kv_cache_dtype_is_a_value_error_naming_the_choices():
    for bad in ("int8", "fp8_e5m2", "bfloat16", None):
        with pytest.raises(ValueError, match="kv_cache_dtype") as error:
            EngineConfig(kv_cache_dtype=bad)
        assert all(repr(name) in str(error.value) for name in KV_CACHE_DTYPES), str(error.value)
    assert EngineConfig().kv_cache_dtype == "auto"


def test_kv_cache_dtype_resolves_against_the_model_dtype():
    assert resolve_kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert resolve_kv_cache_dtype("auto", jnp.float32) == jnp.float32
    for name in ("fp8", "fp8_e4m3"):
        EngineConfig(kv_cache_dtype=name)  # accepted
        assert resolve_kv_cache_dtype(name, jnp.bfloat16) == jnp.float8_e4m3fn
        assert resolve_kv_cache_dtype(name, jnp.float32) == jnp.float8_e4m3fn
    with pytest.raises(ValueError, match="fp8_e4m3"):
        resolve_kv_cache_dtype("fp16", jnp.float32)


@functools.cache
def _model(preset: str):
    config = ModelConfig.from_preset(preset)
    model = build_model(config, None, jnp.float32, "xla", seed=0)
    call = nnx.jit(lambda m, tokens, cache, md: m(tokens, cache, md))
    return config, functools.partial(call, model)


def _prefill_decode_logits(preset: str, tokens: list[int], prefill: int, cache_dtype):
    """Logits [len(tokens), V]: the first ``prefill`` tokens in one step (a 32-token bucket: the KV scatter),
    then one token a step (the one-row KV write); and the cache after them."""
    config, model = _model(preset)
    cache, table = new_cache(config, len(tokens), cache_dtype)
    logits, cache = forward(model, tokens[:prefill], 0, cache, table, bucket=32)
    rows = [logits]
    for position in range(prefill, len(tokens)):
        logits, cache = forward(model, tokens[position:position + 1], position, cache, table)
        rows.append(logits)
    return np.concatenate(rows), cache


@pytest.mark.parametrize("preset", ["tiny-glm4", "tiny-llama"])
def test_fp8_cache_logits_are_close_to_the_float_cache(preset):
    rng = np.random.default_rng(7)
    tokens = rng.integers(3, 512, 24).tolist()
    want, _ = _prefill_decode_logits(preset, tokens, 20, jnp.float32)
    got, cache = _prefill_decode_logits(preset, tokens, 20, jnp.float8_e4m3fn)
    assert cache.k.dtype == cache.v.dtype == jnp.float8_e4m3fn
    assert np.isfinite(got).all()
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    per_token = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    print(f"{preset}: relative logit error {error:.4f} (worst token {per_token.max():.4f})")
    assert 1e-4 < error < MAX_RELATIVE_ERROR, f"relative error {error:.4f}, per token max {per_token.max():.4f}"
    assert per_token.max() < 2 * MAX_RELATIVE_ERROR, per_token
