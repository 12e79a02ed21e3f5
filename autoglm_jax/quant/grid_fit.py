"""Fitting a scheme's grid (its scales) to a weight, given the Gram matrix G = X^T X of its inputs.

Owns two fits that calibration (``quant.calibration``) turns into candidates:
  * ``search_clip``: per scale (per column, per int4 group, per GGUF block) the clipping factor, from
    a grid of shrink factors of the range (the min / max shrink of an asymmetric grid), with the
    lowest diag(G)-weighted squared weight error sum_k G[k, k] (w - Q(w))^2 over the scale's elements;
    exact for a diagonal G, and a few fake-quantizations of the whole weight;
  * ``refit_scales``: for fixed codes, the scales that minimise the layer output error
    tr(dW^T G dW) exactly: per output column a [S, S] least-squares system over its S scales (S = 1
    per-channel, S = groups for int4). Run after GPTQ, whose codes were rounded against the grid of
    the unmodified weight; only families whose dequantized value is linear in ``grid[0]``
    (``REFIT_FAMILIES``: per-channel and int4, the zero points stay as they are).
Does not own the schemes' rounding (``quant.schemes``) or GPTQ (``quant.gptq``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.quant.schemes import QuantScheme

REFIT_FAMILIES = ("channel", "int4")


@functools.partial(jax.jit, static_argnums=(0, 3))
def search_clip(scheme: QuantScheme, w: jax.Array, diag: jax.Array, factors: tuple[float, ...]) -> jax.Array:
    """Clipping factors [..., clip_shape] for w [..., K, N] with input energies diag [..., K] (diag G):
    per scale, the factor of ``factors`` with the lowest weighted error (ties: the first)."""
    w = w.astype(jnp.float32)
    ones = jnp.ones(scheme.clip_shape(w.shape), jnp.float32)

    def error(factor):
        dw = w - scheme.fake_quantize(w, ones * factor)
        return scheme.group_sum(jnp.square(dw) * diag[..., :, None])

    errors = jnp.stack([error(f) for f in factors])                 # [F, ..., clip_shape]
    return jnp.asarray(factors, jnp.float32)[jnp.argmin(errors, axis=0)]


def _blocks(a: jax.Array, size: int, groups: int) -> jax.Array:
    """[K, N] -> [groups, size, N], zero-padded rows at the end."""
    return jnp.pad(a, ((0, groups * size - a.shape[0]), (0, 0))).reshape(groups, size, a.shape[1])


@functools.partial(jax.jit, static_argnums=0)
def _refit(scheme: QuantScheme, w, rows, grid, gram):
    """(new grid, its dequantized rows [K, N]) for one weight w [K, N] whose codes are those of
    ``rows`` on ``grid``; gram [K, K]."""
    k, n = w.shape
    hp = jax.lax.Precision.HIGHEST
    scales = jnp.broadcast_to(scheme.expand(grid, k)[0], (k, n))
    unit = scheme.round_trip(rows, scheme.expand(grid, k)) / scales         # [K, N]: dequantized value per unit scale
    size = k if scheme.family == "channel" else scheme.group_size
    groups = -(-k // size)                                                  # S scales per column
    unit_b = _blocks(unit, size, groups)                                    # [S, size, N]
    pad = groups * size - k
    gram_b = jnp.pad(gram, ((0, pad), (0, pad))).reshape(groups, size, groups, size)  # G[g size + i, h size + j]
    per_h = jnp.einsum("gihj,hjn->gihn", gram_b, unit_b, precision=hp)      # [S, size, S, N]
    normal = jnp.einsum("gin,gihn->ngh", unit_b, per_h, precision=hp)       # [N, S, S]: U_g^T G_gh U_h per column
    target = jnp.einsum("gin,gin->ng", unit_b, _blocks(jnp.dot(gram, w, precision=hp), size, groups))  # [N, S]
    old = grid[0].reshape(groups, n).T                                      # [N, S]
    ridge = 1e-6 * jnp.mean(jnp.diagonal(normal, axis1=-2, axis2=-1), axis=-1)[:, None] + 1e-30  # [N, 1]
    new = jnp.linalg.solve(normal + ridge[..., None] * jnp.eye(groups), (target + ridge * old)[..., None])[..., 0]
    new = jnp.where(jnp.isfinite(new) & (new > 0), new, old).T.reshape(grid[0].shape)
    new_grid = (new, *grid[1:])
    return new_grid, unit * scheme.expand(new_grid, k)[0]


def refit_scales(scheme: QuantScheme, w: jax.Array, rows: jax.Array, grid: tuple, gram: np.ndarray) -> tuple[tuple, jax.Array]:
    """(grid with refitted scales, rows on it) for one float weight w [K, N] (the target) whose codes are
    those of ``rows`` [K, N] (e.g. GPTQ's) on ``grid``, inputs' Gram gram [K, K]: the scales minimising
    tr((w - Q)^T G (w - Q)) with the codes fixed. ``scheme.quantize(new_rows, grid=new_grid)`` keeps the
    codes. A scale whose solution is not positive keeps its old value."""
    if scheme.family not in REFIT_FAMILIES:
        raise ValueError(f"scheme {scheme.name}: scales can be refitted only for families {REFIT_FAMILIES}")
    return _refit(scheme, jnp.asarray(w, jnp.float32), jnp.asarray(rows, jnp.float32), grid,
                  jnp.asarray(gram, jnp.float32))
