"""Stateless building blocks of the decoder: RMSNorm and the linear projection.

Owns: the numerics shared by every architecture (float32 norm statistics, float32 accumulation).
``linear`` is the single place a weight meets an activation, so a quantized weight type only needs
a ``linear`` rule (``autoglm_jax.quant``), never a branch inside a layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., H] normalised in float32, scaled by weight [H] (transformers' LlamaRMSNorm order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


@functools.singledispatch
def linear(weight, x: jax.Array, bias: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """x [..., K] @ weight [K, N] (+ bias [N]) with float32 accumulation, returned in out_dtype.

    Dispatches on the weight's type: plain arrays here; quantized weight pytrees register their own rule.
    """
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.dot(x, weight, preferred_element_type=jnp.float32, precision=precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)
