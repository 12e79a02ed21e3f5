"""Straight-through rounding: the forward pass rounds, the backward pass is the identity.

Owns: the two rounding primitives every scheme's quantizer uses, so one function serves both storing
weights (forward only) and calibration (gradients reach the scales through the rounding, as in LSQ /
OmniQuant-style learned clipping). Does not own any scheme.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_ste(x: jax.Array) -> jax.Array:
    """round-half-to-even(x) forward, d/dx = 1 backward."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def cast_ste(x: jax.Array, dtype) -> jax.Array:
    """x rounded through ``dtype`` (e.g. float8_e4m3fn) and back to x's dtype; d/dx = 1 backward."""
    return x + jax.lax.stop_gradient(x.astype(dtype).astype(x.dtype) - x)
