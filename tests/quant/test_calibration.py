"""Calibrated clipping factors (optax) beat round-to-nearest on each layer's output error."""

import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.quant import get_scheme, model_manifest, quantize_model
from autoglm_jax.quant.calibration import CalibrationConfig, calibrate_model, calibrate_weight, collect_input_stats


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from tests.hf_tiny import save_tiny

    path = tmp_path_factory.mktemp("calib_glm")
    save_tiny("GlmForCausalLM", path, seed=5)
    config, model, _ = load_model(str(path), jnp.float32)
    rng = np.random.default_rng()
    seqs = [rng.integers(3, config.vocab_size, int(rng.integers(8, 48))).tolist() for _ in range(12)]
    return config, model, seqs


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


@pytest.mark.parametrize("scheme", ["int8", "int4-g64", "q4_0"])
def test_calibrated_scales_beat_round_to_nearest(glm, scheme):
    config, model, seqs = glm
    clips, report = calibrate_model(model, seqs, scheme, CalibrationConfig(steps=60))
    for path, (rtn, cal) in report.items():
        print(f"{scheme} {path}: RTN {rtn.mean():.3e} -> calibrated {cal.mean():.3e}")
        assert np.all(cal <= rtn)
        assert clips[path].shape == get_scheme(scheme).clip_shape(model.layers.__getattribute__(path.split('/')[1])[...].shape)
    total_rtn = sum(r.sum() for r, _ in report.values())
    total_cal = sum(c.sum() for _, c in report.values())
    assert total_cal < (0.97 if scheme != "int8" else 0.999) * total_rtn
    quantize_model(model := _clone(model), scheme, clips)  # the clips plug into the transform
    assert set(model_manifest(model).values()) == {get_scheme(scheme).name}


def _clone(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def test_calibrate_weight_checks_shapes():
    w = jnp.ones((2, 64, 32))
    with pytest.raises(ValueError, match="gram shape"):
        calibrate_weight(w, np.ones((2, 32, 32)), "int8")
