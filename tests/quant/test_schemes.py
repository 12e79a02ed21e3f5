"""Each scheme's quantize -> dequantize error, its linear rule, GGUF byte layout, and bad inputs."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import quants

from autoglm_jax.model.layers import linear
from autoglm_jax.quant import SCHEMES, from_gguf_bytes, get_scheme, quantize_int4, to_gguf_bytes

# Relative RMS error ||W - deq(Q(W))|| / ||W|| for Gaussian weights; bounds ~1.5x the expected value.
ERROR_BOUNDS = {"int8": 0.012, "w8a8-int8": 0.012, "fp8": 0.035, "w8a8-fp8": 0.035, "int4-g64": 0.12,
                "int4-g128": 0.13, "q8_0": 0.008, "q4_0": 0.14, "q4_1": 0.12}
# Relative RMS error of linear(Q(W), x) against x @ W (W8A8 adds the activation rounding).
LINEAR_BOUNDS = {"int8": 0.012, "w8a8-int8": 0.02, "fp8": 0.035, "w8a8-fp8": 0.06, "int4-g64": 0.12,
                 "int4-g128": 0.13, "q8_0": 0.008, "q4_0": 0.14, "q4_1": 0.12}


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.fixture
def weight(request):
    seed = np.random.SeedSequence().entropy % 2**31  # fresh inputs every run
    return jax.random.normal(jax.random.key(seed), (2, 192, 96), jnp.float32) * 0.05, seed


@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_error_within_scheme_bound(name, weight):
    w, seed = weight
    q = get_scheme(name).quantize(w)
    deq = q.dequantize()
    assert deq.shape == w.shape == q.shape
    err = _rel(deq, w)
    print(f"{name}: relative RMS error {err:.4f}, max abs {float(jnp.abs(deq - w).max()):.2e} (seed {seed})")
    assert err < ERROR_BOUNDS[name]
    assert err > 1e-4  # it really was quantized


@pytest.mark.parametrize("name", list(SCHEMES))
def test_linear_rule_matches_float_matmul(name, weight):
    w, seed = weight
    q = get_scheme(name).quantize(w)
    layer = jax.tree.map(lambda t: t[1], q)  # what lax.scan hands one layer
    x = jax.random.normal(jax.random.key(seed + 1), (5, 192), jnp.float32)
    bias = jax.random.normal(jax.random.key(seed + 2), (96,), jnp.float32)
    y = linear(layer, x, bias)
    ref = x @ w[1] + bias
    assert y.shape == (5, 96) and y.dtype == jnp.float32
    err = _rel(y - bias, ref - bias)
    print(f"{name}: linear relative RMS error {err:.4f} (seed {seed})")
    assert err < LINEAR_BOUNDS[name]
    if SCHEMES[name].activations is None:  # weight-only: exactly the dequantized weight's product
        np.testing.assert_allclose(y, x @ layer.dequantize() + bias, rtol=1e-4, atol=1e-4)
    y16 = linear(layer, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and _rel(y16.astype(jnp.float32), ref - bias) < LINEAR_BOUNDS[name] + 0.02


def test_int4_packs_two_codes_per_byte_and_allows_a_short_last_group():
    w = jax.random.normal(jax.random.key(7), (576, 64), jnp.float32)  # 576 = 4.5 groups of 128
    q = quantize_int4(w, 128)
    assert q.packed.shape == (576, 32) and q.packed.dtype == jnp.uint8
    assert q.scales.shape == q.zeros.shape == (5, 64)
    assert _rel(q.dequantize(), w) < ERROR_BOUNDS["int4-g128"]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_gguf_blocks_are_byte_identical_to_gguf(kind):
    rows = np.random.default_rng().normal(size=(48, 128)).astype(np.float32)  # GGUF orientation [N, K]
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    theirs = quants.quantize(rows, qtype)
    ours = from_gguf_bytes(theirs, kind)
    assert ours.shape == (128, 48)
    np.testing.assert_array_equal(np.asarray(ours.dequantize_rows()), quants.dequantize(theirs, qtype))
    np.testing.assert_array_equal(to_gguf_bytes(ours), theirs)
    mine = get_scheme(kind).quantize(jnp.asarray(rows.T))  # our quantizer writes valid GGUF blocks
    np.testing.assert_allclose(quants.dequantize(to_gguf_bytes(mine), qtype), np.asarray(mine.dequantize_rows()))


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="nope"):
        get_scheme("nope")
    with pytest.raises(ValueError, match="K=100"):
        get_scheme("q8_0").quantize(jnp.ones((100, 8)))
    with pytest.raises(ValueError, match="N=7"):
        get_scheme("int4").quantize(jnp.ones((64, 7)))
    assert get_scheme("INT4").name == "int4-g128"
