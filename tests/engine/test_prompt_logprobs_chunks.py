"""Prompt logprobs computed in chunks of tokens (bounded scratch memory) equal the one-shot computation."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.engine import step_functions
from autoglm_jax.sampler import gather_logprobs


@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_prompt_logprobs_equal_one_shot(monkeypatch, chunk):
    tokens, hidden_size, vocab, num_logprobs = 16, 8, 50, 3
    keys = jax.random.split(jax.random.key(chunk), 3)
    weight = jax.random.normal(keys[0], (hidden_size, vocab))
    model = types.SimpleNamespace(logits=lambda h: h @ weight)
    hidden = jax.random.normal(keys[1], (tokens, hidden_size))
    next_ids = jax.random.randint(keys[2], (tokens,), -1, vocab)  # -1: no next prompt token
    inp = types.SimpleNamespace(prompt_next_ids=next_ids, want_prompt_logprobs=jnp.bool_(True))
    monkeypatch.setattr(step_functions, "PROMPT_LOGPROBS_CHUNK", chunk)

    got = jax.jit(lambda h: step_functions._prompt_logprobs(model, h, inp, num_logprobs))(hidden)
    want = gather_logprobs(jax.nn.log_softmax(hidden @ weight, axis=-1), jnp.maximum(next_ids, 0), num_logprobs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    skipped = step_functions._prompt_logprobs(model, hidden, types.SimpleNamespace(
        prompt_next_ids=next_ids, want_prompt_logprobs=jnp.bool_(False)), num_logprobs)
    assert all(not np.asarray(x).any() for x in skipped)
