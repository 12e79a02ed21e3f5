"""Grid fits (``quant.grid_fit``): the clip search lowers the diag(G)-weighted weight error of every
scale, and the scale refit lowers the layer output error for fixed codes (to its least-squares optimum)."""

import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.quant import get_scheme
from autoglm_jax.quant.gptq import GPTQConfig, gptq_weight
from autoglm_jax.quant.grid_fit import refit_scales, search_clip

FACTORS = tuple(float(f) for f in np.linspace(1.0, 0.3, 15))


def _heavy_tailed(seed: int, shape):
    """Student-t weights (a few large entries per scale: where clipping pays) and input energies."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_t(3, size=shape) * 0.02, jnp.float32)
    diag = jnp.asarray(np.exp(rng.normal(size=shape[:-1])), jnp.float32)  # [..., K]
    return w, diag


def _weighted_error(scheme, w, diag, clip):
    """sum_k G[k, k] (w - Q(w))^2 per scale: what ``search_clip`` claims to minimise."""
    return np.asarray(scheme.group_sum(jnp.square(w - scheme.fake_quantize(w, clip)) * diag[..., :, None]))


@pytest.mark.parametrize("name", ["int8", "fp8", "int4-g64", "q4_0"])
def test_clip_search_lowers_the_weighted_error_of_every_scale(name):
    scheme = get_scheme(name)
    w, diag = _heavy_tailed(0, (2, 128, 64))
    clip = search_clip(scheme, w, diag, FACTORS)
    assert clip.shape == scheme.clip_shape(w.shape)
    assert set(np.unique(np.asarray(clip))) <= set(np.float32(FACTORS))
    ones = jnp.ones_like(clip)
    searched, rtn = _weighted_error(scheme, w, diag, clip), _weighted_error(scheme, w, diag, ones)
    print(f"{name}: weighted error RTN {rtn.sum():.4e} -> searched {searched.sum():.4e}, "
          f"{np.mean(np.asarray(clip) < 1):.0%} of scales clipped")
    assert np.all(searched <= rtn * (1 + 1e-6))
    assert searched.sum() < (0.97 if scheme.family in ("int4", "gguf") else 0.9999) * rtn.sum()
    for factor in (0.8, 0.5):  # no listed factor does better on any scale
        assert np.all(searched <= _weighted_error(scheme, w, diag, ones * factor) * (1 + 1e-6))


def test_clip_search_keeps_round_to_nearest_where_clipping_never_helps():
    scheme = get_scheme("int8")
    w = jnp.asarray(np.tile(np.linspace(-1, 1, 255)[:, None], (1, 4)), jnp.float32)  # exactly on the grid
    clip = search_clip(scheme, w, jnp.ones(255), FACTORS)
    np.testing.assert_array_equal(clip, np.ones(4))


def _layer(seed: int, k: int = 128, n: int = 64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, k)) * np.exp(rng.normal(size=k))
    return jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32), x.T @ x


def _output_error(w, q, gram) -> float:
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.trace(d.T @ gram @ d))


@pytest.mark.parametrize("name", ["int8", "int4-g64", "int4-g128"])
def test_refit_lowers_the_output_error_and_keeps_the_codes(name):
    scheme = get_scheme(name)
    w, gram = _layer(1)
    grid = scheme.grid(w)
    rows = gptq_weight(scheme, w, gram, grid, GPTQConfig())  # GPTQ's rows: codes chosen on the RTN grid
    before = _output_error(w, scheme.fake_quantize(rows, grid=grid), gram)
    new_grid, new_rows = refit_scales(scheme, w, rows, grid, gram)
    after = _output_error(w, scheme.fake_quantize(new_rows, grid=new_grid), gram)
    print(f"{name}: output error GPTQ {before:.4e} -> refitted scales {after:.4e}")
    assert after < 0.99 * before
    np.testing.assert_allclose(scheme.fake_quantize(new_rows, grid=new_grid), new_rows, rtol=1e-5, atol=1e-7)
    old_codes, new_codes = scheme.quantize(rows, grid=grid), scheme.quantize(new_rows, grid=new_grid)
    for field in ("values", "packed"):
        if hasattr(old_codes, field):
            np.testing.assert_array_equal(getattr(old_codes, field), getattr(new_codes, field))
    for step in (1.002, 0.998):  # least squares: moving the scales either way is worse
        moved = new_rows * step
        assert _output_error(w, moved, gram) > after


def test_refit_rejects_families_with_offsets_in_the_scale():
    w, gram = _layer(2, k=64, n=32)
    scheme = get_scheme("q4_1")
    with pytest.raises(ValueError, match="refitted"):
        refit_scales(scheme, w, w, scheme.grid(w), gram)
