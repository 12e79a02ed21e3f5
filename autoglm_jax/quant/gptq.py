"""GPTQ: round a weight row by row onto a fixed grid, pushing each row's rounding error onto the rows
not yet rounded so that the layer's output error on calibration inputs stays small (Frantar et al., 2022).

Owns: ``gptq_weight`` (one [K, N] weight and the Gram matrix H = X^T X [K, K] of its inputs -> the
float rows GPTQ rounded; ``scheme.quantize(result, grid=grid)`` reproduces its codes exactly) and
``GPTQConfig``. Works for every scheme through ``QuantScheme.expand`` / ``round_trip`` on a static grid
(the scales of the original, possibly clipped, weight), so int8, fp8, int4 and GGUF blocks share it.
Does not own collecting H or choosing between GPTQ and round-to-nearest (``quant.calibration``).

Algorithm (rows k = input features; U = upper Cholesky factor of (H + damp * mean(diag H) I)^-1):
    for k in order:  q_k = Q(w_k);  e_k = (w_k - q_k) / U[k, k];  w_j -= U[k, j] e_k  for j after k
in blocks of ``block`` rows (the update of the remaining rows is one matmul per block). With
``act_order`` rows go by decreasing H[k, k] (the most active inputs first); the grid is per element,
so the order changes nothing but the order of rounding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.quant.schemes import QuantScheme


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """damp: fraction of mean(diag H) added to the diagonal; block: rows per lazy update;
    act_order: round the most active input features first."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True

    def __post_init__(self):
        if not 0 < self.damp < 1 or self.block < 1:
            raise ValueError(f"damp={self.damp} must be in (0, 1) and block={self.block} >= 1")


def _inverse_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper U [K, K] float64 with U^T U = (H + damp * mean(diag H) I)^-1; inputs never seen get H[k, k] = 1."""
    h = np.array(hessian, np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    diag[dead] = 1.0
    h[np.diag_indices_from(h)] += damp * diag.mean()
    inv_lower = np.linalg.inv(np.linalg.cholesky(h))             # H = L L^T, H^-1 = L^-T L^-1
    return np.linalg.cholesky(inv_lower.T @ inv_lower).T


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rows(scheme: QuantScheme, block: int, w, u, params):
    """GPTQ over w [Kp, N] (Kp a multiple of block) with u [Kp, Kp] and per-element params [Kp, N];
    returns the rows as rounded [Kp, N]."""
    kp = w.shape[0]
    steps = jnp.arange(block)

    def one_block(b, w):
        start = b * block
        rows = jax.lax.dynamic_slice_in_dim(w, start, block)                      # [B, N]
        u_rows = jax.lax.dynamic_slice_in_dim(u, start, block)                    # [B, Kp]
        u_diag = jax.lax.dynamic_slice_in_dim(u_rows, start, block, axis=1)       # [B, B]
        p = tuple(jax.lax.dynamic_slice_in_dim(a, start, block) for a in params)

        def one_row(i, carry):
            rows, errs = carry
            row = rows[i]
            q = scheme.round_trip(row[None], tuple(a[i][None] for a in p))[0]
            err = (row - q) / u_diag[i, i]
            rows = rows - jnp.where(steps > i, u_diag[i], 0.0)[:, None] * err[None]
            return rows, errs.at[i].set(err)

        rows, errs = jax.lax.fori_loop(0, block, one_row, (rows, jnp.zeros_like(rows)))
        later = jnp.where(jnp.arange(kp) >= start + block, u_rows, 0.0)            # [B, Kp]
        w = w - jnp.dot(later.T, errs, precision=jax.lax.Precision.HIGHEST)
        return jax.lax.dynamic_update_slice_in_dim(w, rows, start, axis=0)

    return jax.lax.fori_loop(0, kp // block, one_block, w)


def gptq_weight(scheme: QuantScheme, w: jax.Array, hessian: np.ndarray, grid: tuple,
                cfg: GPTQConfig = GPTQConfig()) -> jax.Array:
    """The rows GPTQ rounded, float32 [K, N], for one float weight w [K, N] whose inputs have Gram
    matrix ``hessian`` [K, K], rounding onto ``grid`` (``scheme.grid`` of w, e.g. with clipping).
    ``scheme.quantize(result, grid=grid)`` is the quantized weight; ``scheme.fake_quantize(result,
    grid=grid)`` its dequantized value."""
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    if np.shape(hessian) != (k, k):
        raise ValueError(f"hessian shape {np.shape(hessian)} does not match weight shape {(k, n)} (want [K, K])")
    hessian = np.asarray(hessian, np.float64)
    order = np.argsort(-np.diag(hessian), kind="stable") if cfg.act_order else np.arange(k)
    u = _inverse_factor(hessian[np.ix_(order, order)], cfg.damp)
    params = tuple(jnp.broadcast_to(a, (k, n))[order] for a in scheme.expand(grid, k))
    pad = -k % cfg.block
    kp = k + pad
    u_pad = np.eye(kp)
    u_pad[:k, :k] = u
    w_pad = jnp.pad(w[order], ((0, pad), (0, 0)))
    params = tuple(jnp.pad(a, ((0, pad), (0, 0)), mode="edge") for a in params)
    rows = _rows(scheme, cfg.block, w_pad, jnp.asarray(u_pad, jnp.float32), params)[:k]
    return rows[np.argsort(order)]
