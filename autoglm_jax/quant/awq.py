"""Activation-aware per-input-channel scaling (AWQ, Lin et al., 2023) for weights that hold ``in_scales``.

Owns: choosing, per layer, the input multipliers a [K] of a weight w [K, N] whose inputs have Gram
matrix G [K, K]: the weight is quantized as w / a (rows of input channels with large activations
scaled up, so their relative rounding error shrinks) and the linear rule multiplies x by a, which
leaves x @ w unchanged before rounding. a = 1 / s with s = rms(x)^alpha (rms(x_k) = sqrt(G[k, k])),
normalised to geometric mean 1; alpha per layer from ``alphas`` by the round-to-nearest output error
||A (w - a Q(w / a))||^2, A [r, K] a low-rank factor of G (A^T A ~= G); alpha = 0 is a = 1.
Also owns the change of variables: (w / a, diag(a) G diag(a)) is the same problem in scaled
coordinates (x' = x a, w' = w / a: x' w' = x w), so GPTQ and the grid fits run on it unchanged.
Does not own the weight type (``quant.int4``: ``in_scales``) or the other calibration candidates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.quant.schemes import QuantScheme

SCALED_FAMILIES = ("int4",)  # weight types whose linear rule applies in_scales


def scales_for(diag: jax.Array, alpha) -> jax.Array:
    """Input multipliers a [..., K] for input energies diag [..., K] (diag of G) and exponent alpha
    [...]: 1 / s, s = rms^alpha over its geometric mean; channels never seen keep a = 1."""
    rms = jnp.sqrt(jnp.maximum(diag, 0.0))
    seen = rms > 0
    log_rms = jnp.log(jnp.where(seen, rms, 1.0))
    mean = jnp.sum(jnp.where(seen, log_rms, 0.0), -1, keepdims=True) / jnp.maximum(jnp.sum(seen, -1, keepdims=True), 1)
    log_s = jnp.where(seen, jnp.asarray(alpha)[..., None] * (log_rms - mean), 0.0)
    return jnp.exp(-log_s)


@functools.partial(jax.jit, static_argnums=(0, 3))
def choose_input_scales(scheme: QuantScheme, w: jax.Array, factor: jax.Array, alphas: tuple[float, ...],
                        diag: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a [L, K], alpha [L]) for stacked w [L, K, N], factors [L, r, K] of the Grams and their diagonals
    diag [L, K]: per layer the alpha of ``alphas`` with the lowest round-to-nearest output error."""
    def error(alpha):
        a = scales_for(diag, jnp.full(diag.shape[:-1], alpha))
        dw = w - a[..., None] * scheme.fake_quantize(w / a[..., None])
        return jnp.sum(jnp.square(jnp.matmul(factor, dw)), axis=(-2, -1))      # [L]

    errors = jnp.stack([error(alpha) for alpha in alphas])                     # [A, L]
    alpha = jnp.asarray(alphas, jnp.float32)[jnp.argmin(errors, axis=0)]
    return scales_for(diag, alpha), alpha


def scaled_problem(w: jax.Array, gram: np.ndarray, a: jax.Array) -> tuple[jax.Array, np.ndarray]:
    """(w / a [.., K, N], diag(a) G diag(a) [.., K, K]): the same layer in the coordinates x' = x a."""
    a_host = np.asarray(a, np.float64)
    return w / a[..., :, None], gram * a_host[..., :, None] * a_host[..., None, :]
