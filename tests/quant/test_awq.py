"""Activation-aware input scales (``quant.awq``) for int4: they lower the layer output error where a few
input channels carry outlier activations, the int4 rule applies them, and calibration never keeps them
where they make a layer worse than round-to-nearest."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.model.layers import linear
from autoglm_jax.quant import get_scheme
from autoglm_jax.quant.awq import choose_input_scales, scaled_problem, scales_for
from autoglm_jax.quant.calibration import AWQ_ALPHAS, CalibrationConfig, _factor, calibrate_weight

SCHEME = get_scheme("int4-g64")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _outlier_layer(seed: int, layers: int = 1, k: int = 128, n: int = 64, tokens: int = 512):
    """(x [T, K] with 6 outlier channels 30x the others, w [L, K, N] float32, gram [L, K, K] float64)."""
    rng = np.random.default_rng(seed)
    channels = np.ones(k)
    channels[rng.choice(k, 6, replace=False)] = 30.0
    x = rng.normal(size=(tokens, k)) * channels
    w = jnp.asarray(rng.normal(size=(layers, k, n)) * 0.05, jnp.float32)
    return x, w, np.stack([x.T @ x] * layers)


def _output_error(x, w, deq) -> float:
    """||X (W - deq)||^2 / ||X W||^2 of one layer, float64."""
    w, deq = np.asarray(w, np.float64), np.asarray(deq, np.float64)
    return float(np.sum((x @ (w - deq)) ** 2) / np.sum((x @ w) ** 2))


def _choose(w, gram, alphas=ALPHAS):
    factor = jnp.asarray(np.stack([_factor(g, None) for g in gram]))
    diag = jnp.asarray(np.diagonal(gram, axis1=-2, axis2=-1), jnp.float32)
    return choose_input_scales(SCHEME, w, factor, alphas, diag)


def _scaled_rtn(w, a):
    """Round-to-nearest of w / a with the scales folded back: the weight the int4 rule multiplies by."""
    return a[..., :, None] * SCHEME.fake_quantize(w / a[..., :, None])


@pytest.mark.parametrize("seed", [0, 1])
def test_awq_scales_lower_the_output_error_on_outlier_channels(seed):
    x, w, gram = _outlier_layer(seed)
    a, alpha = _choose(w, gram)
    assert 0 < float(alpha[0]) < 1  # neither "no scaling" nor the extreme won
    plain = _output_error(x, w[0], SCHEME.fake_quantize(w)[0])
    scaled = _output_error(x, w[0], _scaled_rtn(w, a)[0])
    print(f"seed {seed}: alpha {float(alpha[0])}, RTN error {plain:.3e} -> with input scales {scaled:.3e}")
    assert scaled < 0.6 * plain
    np.testing.assert_allclose(np.exp(np.mean(np.log(np.asarray(a)))), 1.0, rtol=1e-5)  # geometric mean 1
    outliers = np.sqrt(np.diagonal(gram[0])) > 10 * np.median(np.sqrt(np.diagonal(gram[0])))
    assert np.all(np.asarray(a[0])[outliers] < np.asarray(a[0])[~outliers].min())  # outlier rows scaled up


def test_scales_for_alpha_zero_is_identity_and_unseen_channels_keep_one():
    diag = jnp.asarray([[4.0, 0.0, 1.0, 16.0]])
    np.testing.assert_array_equal(scales_for(diag, jnp.asarray([0.0])), np.ones((1, 4)))
    a = np.asarray(scales_for(diag, jnp.asarray([1.0])))
    assert a[0, 1] == 1.0 and a[0, 3] < a[0, 0] < a[0, 2]


def test_scaled_problem_has_the_same_errors():
    x, w, gram = _outlier_layer(3)
    a = scales_for(jnp.asarray(np.diagonal(gram, axis1=-2, axis2=-1), jnp.float32), jnp.asarray([0.5]))
    w_s, gram_s = scaled_problem(w, gram, a)
    q_s = SCHEME.fake_quantize(w_s)  # any weight in the scaled coordinates
    d_s = np.asarray(w_s - q_s, np.float64)[0]
    in_scaled = np.trace(d_s.T @ gram_s[0] @ d_s) / np.sum((x @ np.asarray(w[0], np.float64)) ** 2)
    np.testing.assert_allclose(in_scaled, _output_error(x, w[0], a[0][:, None] * q_s[0]), rtol=1e-4)


def test_int4_rule_multiplies_x_by_the_input_scales():
    _, w, gram = _outlier_layer(4, layers=2)
    weight, _, _ = calibrate_weight(w, gram, SCHEME, CalibrationConfig(steps=0, search=0, gptq=None, awq_alphas=AWQ_ALPHAS))
    assert weight.in_scales is not None and weight.in_scales.shape == (2, 128)
    np.testing.assert_allclose(weight.dequantize(), _scaled_rtn(w, weight.in_scales), rtol=1e-6, atol=1e-7)
    layer = jax.tree.map(lambda t: t[1], weight)  # what lax.scan hands one layer
    x = jax.random.normal(jax.random.key(0), (5, 128), jnp.float32)
    np.testing.assert_allclose(linear(layer, x), x @ layer.dequantize(), rtol=1e-4, atol=1e-5)
    without = jax.tree.map(lambda t: t[1], weight.__class__(weight.packed, weight.scales, weight.zeros,
                                                            weight.group_size))
    assert not np.allclose(linear(without, x), linear(layer, x), rtol=1e-2)  # the scales matter


def test_calibration_drops_input_scales_that_make_a_layer_worse():
    """alpha = 1 alone (full equalisation) is worse than round-to-nearest on these layers: calibration
    must keep the unscaled result there (input scales 1), never report or keep a worse layer."""
    x, w, gram = _outlier_layer(5, layers=2)
    forced = CalibrationConfig(steps=0, search=0, gptq=None, awq_alphas=(1.0,), rank=None)
    a, _ = _choose(w, gram, (1.0,))
    assert _output_error(x, w[0], _scaled_rtn(w, a)[0]) > _output_error(x, w[0], SCHEME.fake_quantize(w)[0])
    weight, rtn, cal = calibrate_weight(w, gram, SCHEME, forced)
    np.testing.assert_array_equal(weight.in_scales, np.ones((2, 128)))
    np.testing.assert_allclose(cal, rtn, rtol=1e-6)
    np.testing.assert_array_equal(weight.dequantize(), SCHEME.fake_quantize(w))
    chosen, rtn, cal = calibrate_weight(w, gram, SCHEME, CalibrationConfig(steps=0, search=0, gptq=None,
                                                                           awq_alphas=AWQ_ALPHAS))
    assert not np.allclose(chosen.in_scales, 1.0) and np.all(cal < 0.6 * rtn)  # a good alpha is kept
    for layer in range(2):
        np.testing.assert_allclose(cal[layer], _output_error(x, w[layer], chosen.dequantize()[layer]), rtol=1e-3)


def test_awq_calibration_is_never_worse_than_without_it():
    """With GPTQ in both, the scaled problem may end worse than the unscaled one: per layer the better
    of the two is kept, so turning AWQ on never raises a layer's calibration error."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(512, 128)) * np.exp(rng.normal(size=128))
    w = jnp.asarray(rng.normal(size=(3, 128, 64)) * 0.05, jnp.float32)
    gram = np.stack([x.T @ x] * 3)
    base = CalibrationConfig(steps=0, search=0)
    plain, _, cal_plain = calibrate_weight(w, gram, SCHEME, base)
    for alphas in ((1.0,), AWQ_ALPHAS):
        weight, _, cal = calibrate_weight(w, gram, SCHEME, dataclasses.replace(base, awq_alphas=alphas))
        print(f"alphas {alphas}: without AWQ {cal_plain} -> with {cal}")
        assert np.all(cal <= cal_plain * (1 + 1e-6))
        for layer in range(3):
            np.testing.assert_allclose(cal[layer], _output_error(x, w[layer], weight.dequantize()[layer]), rtol=1e-3)
