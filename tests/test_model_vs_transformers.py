"""Our model's logits against transformers on tiny random checkpoints of every architecture (float32)."""

import numpy as np
import pytest
import torch

from autoglm_jax.checkpoint.loader import load_model
from tests.hf_tiny import ARCHITECTURES, save_tiny
from tests.model_runner import forward, new_cache


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(request.param, directory, seed=len(request.param))
    config, model, _ = load_model(str(directory), dtype=np.float32)
    return hf, config, model


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float().numpy()


def test_full_forward_matches_transformers(tiny_pair):
    hf, config, model = tiny_pair
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, 37).tolist()
    cache, table = new_cache(config, 64)
    ours, _ = forward(model, tokens, 0, cache, table, bucket=48)
    ref = hf_logits(hf, tokens)
    err = np.abs(log_softmax(ours) - log_softmax(ref))
    assert err.max() <= 1e-4, f"max |dlogsoftmax| {err.max():.2e}, mean {err.mean():.2e}"
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_prefill_then_decode_matches_full_forward(tiny_pair):
    _, config, model = tiny_pair
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, 30).tolist()
    cache, table = new_cache(config, 64)
    full, _ = forward(model, tokens, 0, cache, table)
    cache, table = new_cache(config, 64)
    prefill, cache = forward(model, tokens[:19], 0, cache, table, bucket=32)
    steps = [prefill]
    for i in range(19, 30):
        step, cache = forward(model, [tokens[i]], i, cache, table, bucket=4)
        steps.append(step)
    chunked = np.concatenate(steps)
    err = np.abs(chunked - full)
    assert err.max() <= 1e-4 * np.abs(full).max(), f"max {err.max():.2e} mean {err.mean():.2e}"


def test_greedy_tokens_match_transformers(tiny_pair):
    hf, config, model = tiny_pair
    prompt = np.random.default_rng(2).integers(0, config.vocab_size, 11).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    cache, table = new_cache(config, 64)
    logits, cache = forward(model, prompt, 0, cache, table)
    out = [int(logits[-1].argmax())]
    while len(out) < 20:
        logits, cache = forward(model, [out[-1]], len(prompt) + len(out) - 1, cache, table)
        out.append(int(logits[-1].argmax()))
    assert out == ref
