"""``autoglm analyze`` on the tiny models: fusion toggles change the counts, FLOPs match a hand count,
the fusion variants compute what the production model computes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.decoder import CausalLM
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.tools import flop_count
from autoglm_jax.tools.analysis import analyze, format_report
from autoglm_jax.tools.fusion_variants import ALL_FUSIONS, UNFUSED, Fusions, variant_forward, variant_params
from autoglm_jax.tools.roofline import device_spec

ENGINE = EngineConfig(dtype="float32", max_batch_size=4, max_num_batched_tokens=32, max_sequence_length=64,
                      page_size=16, decode_steps_per_call=2, max_logprobs=2, compilation_cache_dir=None)
TINY = ("tiny-llama", "tiny-glm4")


@pytest.fixture(scope="module", params=TINY)
def report(request):
    config = ModelConfig.from_preset(request.param)
    return config, analyze(config, ENGINE, spec=device_spec("NVIDIA H100 80GB HBM3"))


def _fusion(report, shape_prefix, label):
    return next(f for f in report["fusions"] if f["shape"].startswith(shape_prefix) and f["label"] == label)


@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_fusion_toggles_change_counts(report, shape):
    config, rep = report
    unfused = _fusion(rep, shape, UNFUSED.label)
    qkv_only = _fusion(rep, shape, Fusions(fused_qkv=True, fused_gate_up=False).label)
    production = _fusion(rep, shape, Fusions().label)
    folded = _fusion(rep, shape, ALL_FUSIONS.label)
    # per layer-scan body: q/k/v -> one dot removes 2, gate/up -> one dot removes 1
    assert unfused["hlo_dots"] - qkv_only["hlo_dots"] == 2
    assert qkv_only["hlo_dots"] - production["hlo_dots"] == 1
    assert unfused["compiled_kernels"] > production["compiled_kernels"]
    assert folded["hlo_ops"] < production["hlo_ops"]  # the scale multiplies are gone
    assert len({f["matmul_flops"] for f in rep["fusions"] if f["shape"].startswith(shape)}) == 1


def test_flops_agree_with_hand_count(report):
    config, rep = report
    prefill, decode = rep["steps"]
    linear = flop_count.linear_flops(config, prefill["num_tokens"])
    attention = flop_count.attention_flops(config, prefill["num_tokens"], prefill["context"])
    # an independent hand count: 2 * linear params * tokens + attention + LM head over B + T rows
    by_params = 2 * prefill["num_tokens"] * (config.num_parameters() - config.vocab_size * config.hidden_size
                                             * (1 if config.tie_word_embeddings else 2))
    assert abs(linear - by_params) / by_params < 0.05  # norms and biases are the only difference
    for step in (prefill, decode):
        error = abs(step["matmul_flops"] - step["hand_flops"]) / step["hand_flops"]
        assert error < 0.10, f"{step['step']}: compiled {step['matmul_flops']} vs hand {step['hand_flops']}"
    assert prefill["matmul_flops"] > attention + linear


def test_min_bytes_count_the_cache_dtype():
    """An fp8 cache's K/V bytes are a quarter of a float32 model's (weights unchanged); None = the model's dtype."""
    config = ModelConfig.from_preset("tiny-glm4")
    kv = lambda cache_dtype: (flop_count.step_min_bytes(config, jnp.float32, 8, 4, 64, cache_dtype)
                              - flop_count.step_min_bytes(config, jnp.float32, 0, 0, 64, cache_dtype))
    float32_kv = (4 * 64 + 8) * 2 * config.num_hidden_layers * config.kv_size * 4
    assert kv(jnp.float8_e4m3fn) * 4 == kv(None) == kv(jnp.float32) == float32_kv


def test_report_has_rooflines_and_renders(report):
    config, rep = report
    for step in rep["steps"]:
        assert step["roofline"]["bound"] in ("memory", "compute") and step["roofline"]["time_s"] > 0
        assert step["hlo"]["num_fusions"] > 0 and step["hlo"]["op_counts"]["dot"] >= 4
    text = format_report(rep)
    assert "prefill T=32 B=4" in text and "decode T=4 B=4" in text and "folded_norm_scales" in text


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("fusions", [UNFUSED, Fusions(fused_qkv=False, fused_gate_up=True), ALL_FUSIONS])
def test_variants_compute_the_production_forward(preset, fusions):
    config = ModelConfig.from_preset(preset)
    model = CausalLM(config, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # non-trivial norm scales so folding them is exercised
    rng = np.random.default_rng(7)
    for name in ("input_norm", "mlp_norm"):
        params["layers"][name] = jnp.asarray(1 + 0.3 * rng.standard_normal(params["layers"][name].shape), jnp.float32)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, 12), jnp.int32)
    md = AttentionMetadata.build(np.array([0, 0]), np.array([7, 5]), np.array([[1], [2]]), 16, 12)
    kv = KVCache.create(config, 3, 16, jnp.float32)
    rows = jnp.asarray([6, 11], jnp.int32)
    expected, _ = model(tokens, kv, md, rows)
    got, _ = variant_forward(config, "xla", variant_params(config, params, fusions), tokens, kv, md, rows)
    error = np.abs(np.asarray(got) - np.asarray(expected))
    assert error.max() < 1e-4, f"{fusions.label}: max {error.max():.2e} mean {error.mean():.2e}"
