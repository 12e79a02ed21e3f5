"""A quantized model's next-token distribution stays close to the float model's (KL bounds per scheme),
layers hold the quantized pytrees, and the engine/convert entry points take ``quantization``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.quant import SCHEMES, model_manifest, quantize_model
from tests.model_runner import forward, new_cache

# Mean KL(float || quantized) over positions, tiny checkpoints (std 0.08 weights, V = 256).
KL_BOUNDS = {"int8": 1e-3, "w8a8-int8": 1e-3, "fp8": 5e-3, "w8a8-fp8": 1e-2, "q8_0": 1e-3,
             "int4-g64": 5e-2, "int4-g128": 5e-2, "q4_0": 5e-2, "q4_1": 5e-2}
# Top-1 agreement only as a sanity floor: random tiny models have near-flat distributions (the
# agreement targets are checked on SmolLM2 by benchmarks/quant_quality.py).
TOP1_FLOOR = {"int8": 0.75, "w8a8-int8": 0.75, "fp8": 0.7, "w8a8-fp8": 0.7, "q8_0": 0.75,
              "int4-g64": 0.4, "int4-g128": 0.4, "q4_0": 0.4, "q4_1": 0.4}


def _logits(model, config, tokens):
    cache, table = new_cache(config, len(tokens))
    return jnp.asarray(forward(model, tokens, 0, cache, table)[0])


def kl_and_top1(ref, out):
    p, q = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(out, -1)
    kl = jnp.sum(jnp.exp(p) * (p - q), -1)
    return float(kl.mean()), float(jnp.mean(ref.argmax(-1) == out.argmax(-1)))


@pytest.fixture(scope="module")
def float_reference(tiny_checkpoint):
    """(architecture, config, float model, token sequences, float logits [3 * 40, V])."""
    arch, path = tiny_checkpoint
    config, model, _ = load_model(path, jnp.float32)
    rng = np.random.default_rng()
    seqs = [rng.integers(3, config.vocab_size, 40) for _ in range(3)]
    return arch, config, model, seqs, jnp.concatenate([_logits(model, config, t) for t in seqs])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_logits_close_to_float(float_reference, scheme):
    arch, config, ref_model, seqs, ref = float_reference
    graphdef, state = nnx.split(ref_model)
    model = nnx.merge(graphdef, state)  # a second module over the same float arrays
    quantize_model(model, scheme)
    assert set(model_manifest(model)) == {"layers/qkv", "layers/o", "layers/gate_up", "layers/down"}
    assert set(model_manifest(model).values()) == {scheme}
    assert model.embed_tokens[...].dtype == model.lm_head[...].dtype == jnp.float32
    out = jnp.concatenate([_logits(model, config, t) for t in seqs])
    kl, top1 = kl_and_top1(ref, out)
    print(f"{arch} {scheme}: mean KL {kl:.2e}, top-1 agreement {top1:.3f}")
    assert 0 < kl < KL_BOUNDS[scheme]
    assert top1 >= TOP1_FLOOR[scheme]


def test_requantizing_a_quantized_model_is_refused():
    from autoglm_jax.quant.transform import apply_quantization, quantize_model

    _, model, _ = load_model("tiny-llama", jnp.float32, quantization="int8")
    assert apply_quantization(model, "int8") == model_manifest(model)  # same scheme: accepted as is
    with pytest.raises(ValueError, match="quantized already"):
        apply_quantization(model, "int4")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(model, "int8")


def test_engine_config_validates_quantization():
    assert EngineConfig(quantization="int4").quantization == "int4"
    with pytest.raises(ValueError, match="int3"):
        EngineConfig(quantization="int3")


def test_engine_generates_with_a_quantized_model():
    from autoglm_jax import LLM, SamplingParams

    llm = LLM(model="tiny-llama", quantization="w8a8-int8", skip_tokenizer_init=True, dtype="float32",
              max_batch_size=2, max_model_len=64, max_num_batched_tokens=32, decode_steps_per_call=2,
              show_progress=False, compilation_cache_dir=None)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6
