"""Calibration (optax-learned clipping, then GPTQ) beats round-to-nearest on each layer's output error."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.quant import model_manifest, quantize_model
from autoglm_jax.quant.activation_stats import collect_input_stats
from autoglm_jax.quant.calibration import CalibrationConfig, calibrate_model, calibrate_params, calibrate_weight
from autoglm_jax.tree_paths import flatten


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from tests.hf_tiny import save_tiny

    path = tmp_path_factory.mktemp("calib_glm")
    save_tiny("GlmForCausalLM", path, seed=5)
    config, model, _ = load_model(str(path), jnp.float32)
    rng = np.random.default_rng()
    seqs = [rng.integers(3, config.vocab_size, int(rng.integers(8, 48))).tolist() for _ in range(12)]
    return config, model, seqs


def _clone(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def test_input_stats_are_the_gram_of_the_layer_inputs(glm):
    config, model, seqs = glm
    grams, tokens = collect_input_stats(model, seqs, "int8")
    assert tokens == sum(len(s) for s in seqs)
    L, H, I = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    assert grams["layers/qkv"].shape == (L, H, H) and grams["layers/down"].shape == (L, I, I)
    for gram in grams.values():
        np.testing.assert_allclose(gram, np.swapaxes(gram, 1, 2), rtol=1e-10)
        assert np.all(np.linalg.eigvalsh(gram) > -1e-6 * np.abs(gram).max())  # positive semi-definite
        assert np.all(np.trace(gram, axis1=1, axis2=2) > 0)


def test_a_shared_prefix_is_counted_once(glm):
    config, model, seqs = glm
    prefix = seqs[0][:6]
    prefixed = [prefix + s for s in seqs[:3]]
    grams, tokens = collect_input_stats(model, prefixed, "int8")
    assert tokens == len(prefixed[0]) + sum(len(s) for s in seqs[1:3])
    once, _ = collect_input_stats(model, prefixed[:1], "int8")
    rest = [collect_input_stats(model, [s], "int8")[0] for s in prefixed[1:]]
    head = collect_input_stats(model, [prefix], "int8")[0]
    for path, gram in grams.items():  # first sequence whole + the others without the prefix rows
        expected = once[path] + sum(r[path] - head[path] for r in rest)
        np.testing.assert_allclose(gram, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_the_attention_sink_row_counts_once_per_position_for_qkv_only(glm):
    """qkv's Gram counts the first position of a sequence once per position that reads its key and value
    (n times in all); other weights count it once."""
    _, model, seqs = glm
    seq = seqs[0]
    weighted, tokens = collect_input_stats(model, [seq], "int8")
    plain, _ = collect_input_stats(model, [seq], "int8", sink_paths="")
    first, _ = collect_input_stats(model, [seq[:1]], "int8", sink_paths="")  # x_0 x_0^T
    assert tokens == len(seq)
    for path, gram in weighted.items():
        extra = (len(seq) - 1) * first[path] if path == "layers/qkv" else 0 * first[path]
        np.testing.assert_allclose(gram - plain[path], extra, rtol=1e-5, atol=1e-6 * np.abs(gram).max())
    assert np.abs(first["layers/qkv"]).max() > 0


@pytest.fixture(scope="module")
def glm_grams(glm):
    _, model, seqs = glm
    return collect_input_stats(model, seqs, "int8")[0]


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4-g64", "q4_0"])
@pytest.mark.parametrize("gptq", [False, True])
def test_calibrated_weights_beat_round_to_nearest(glm, glm_grams, scheme, gptq):
    config, model, seqs = glm
    cfg = CalibrationConfig(steps=40) if gptq else CalibrationConfig(steps=40, gptq=None)
    weights = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    calibrated, report = calibrate_params(weights, glm_grams, scheme, cfg)
    assert set(calibrated) == {"layers/qkv", "layers/o", "layers/gate_up", "layers/down"}
    for path, (rtn, cal) in report.items():
        print(f"{scheme} gptq={gptq} {path}: RTN {rtn.mean():.3e} -> calibrated {cal.mean():.3e}")
        assert np.all(cal <= rtn)
    total_rtn = sum(r.sum() for r, _ in report.values())
    total_cal = sum(c.sum() for _, c in report.values())
    assert total_cal < (0.5 if gptq else 0.999 if scheme in ("int8", "fp8") else 0.97) * total_rtn
    quantized = _clone(model)
    quantize_model(quantized, scheme, calibrated)  # the calibrated weights plug into the transform
    assert set(model_manifest(quantized).values()) == {scheme}


def test_calibrate_model_is_stats_then_params(glm, glm_grams):
    _, model, seqs = glm
    cfg = CalibrationConfig(steps=5)
    calibrated, report = calibrate_model(model, seqs, "int4-g64", cfg)
    weights = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    again, _ = calibrate_params(weights, glm_grams, "int4-g64", cfg)
    for path, weight in calibrated.items():
        np.testing.assert_allclose(weight.dequantize(), again[path].dequantize(), rtol=1e-6, atol=1e-6)
    assert all(np.all(cal <= rtn) for rtn, cal in report.values())


def test_reported_errors_are_the_layer_output_errors(glm):
    """The report's errors are ||X (W - Q)||^2 / ||X W||^2 of the weights handed back, on fresh inputs X."""
    rng = np.random.default_rng()
    x = rng.normal(size=(300, 64)) * np.exp(rng.normal(size=64))
    w = jnp.asarray(rng.normal(size=(2, 64, 48)) * 0.05, jnp.float32)
    gram = np.stack([x.T @ x] * 2)
    weight, rtn, cal = calibrate_weight(w, gram, "int4-g64", CalibrationConfig(steps=20))
    ref = np.asarray(w, np.float64)
    for got, q in ((rtn, "int4-g64"), (cal, weight)):
        from autoglm_jax.quant import get_scheme

        deq = np.asarray(get_scheme(q).quantize(w).dequantize() if isinstance(q, str) else q.dequantize(), np.float64)
        expected = [np.sum((x @ (ref[l] - deq[l])) ** 2) / np.sum((x @ ref[l]) ** 2) for l in range(2)]
        np.testing.assert_allclose(got, expected, rtol=1e-3)
    assert np.all(cal < rtn)


def test_calibration_rejects_bad_input():
    w = jnp.ones((2, 64, 32))
    with pytest.raises(ValueError, match="gram shape"):
        calibrate_weight(w, np.ones((2, 32, 32)), "int8")
    with pytest.raises(ValueError, match="calibrated weight"):
        _, model, _ = load_model("tiny-llama", jnp.float32)
        quantize_model(model, "int8", {"layers/o": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="steps"):
        CalibrationConfig(steps=-1)
