"""Unrolled layers over per-layer weight buffers (engine arg ``scan_layers=False``, the GPU default)
serve exactly what the scanned, stacked layers serve: plain and quantized weights, and the in-place
unstacking leaves every layer's weights where the stacked array had them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.checkpoint.loader import build_model
from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.core import resolve_scan_layers
from autoglm_jax.llm import LLM
from autoglm_jax.sampling_params import SamplingParams

ARGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, max_batch_size=4, max_num_batched_tokens=16,
            decode_steps_per_call=4, max_logprobs=2, show_progress=False, warmup=False, dtype="float32",
            max_model_len=64)


def _generate(model: str, **overrides):
    llm = LLM(model, **ARGS, **overrides)
    rng = np.random.default_rng(5)
    vocab = llm.engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, n).tolist()} for n in (7, 19, 3)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (9, 5, 12)]
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("model, quantization", [("tiny-glm4", None), ("tiny-llama", None), ("tiny-glm4", "int8")])
def test_unrolled_layers_serve_the_same_tokens_and_logprobs(model, quantization):
    scanned = _generate(model, scan_layers=True, quantization=quantization)
    unrolled = _generate(model, scan_layers=False, quantization=quantization)
    assert [t for t, _ in unrolled] == [t for t, _ in scanned]
    for (_, a), (_, b) in zip(unrolled, scanned):
        np.testing.assert_allclose([x.logprob for x in a], [x.logprob for x in b], atol=1e-5)


def test_unstack_splits_every_layer_parameter_in_place():
    config = ModelConfig.from_preset("tiny-glm4")
    model = build_model(config, None, jnp.float32, "xla")
    stacked = {name: np.asarray(getattr(model.layers, name).get_value()) for name in model.layers.names}
    model.layers.unstack()
    model.layers.unstack()  # idempotent
    assert not model.layers.scan
    for name, array in stacked.items():
        parts = getattr(model.layers, name).get_value()
        assert isinstance(parts, tuple) and len(parts) == config.num_hidden_layers
        for layer, part in enumerate(parts):
            np.testing.assert_array_equal(np.asarray(part), array[layer])
    _, state = nnx.split(model)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(stacked)) * config.num_hidden_layers + 3


def test_scan_layers_auto_is_unrolled_only_on_gpu():
    assert resolve_scan_layers(None) == (jax.default_backend() != "gpu")
    assert resolve_scan_layers(True) is True and resolve_scan_layers(False) is False
