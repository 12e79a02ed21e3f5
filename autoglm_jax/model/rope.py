"""Rotary position embedding, partial and in either pair layout, exactly as transformers computes it.

Owns: inverse frequencies (default, linear and llama3 scaling) and applying the rotation to q/k.
Layouts (the first ``rotary_dim`` features of each head rotate, the rest pass through):
  - half-split (Llama, Qwen2): feature i pairs with i + rotary_dim/2;
  - interleaved (GLM): feature 2i pairs with 2i + 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[rotary_dim / 2] float32, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    dim = config.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotates x [T, N, D] at positions [T]; computed in float32, returned in x's dtype."""
    rotary_dim = config.rotary_dim
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inverse_frequencies(config))[None, :]
    cos = jnp.cos(angles)[:, None, :]  # [T, 1, rotary_dim / 2]
    sin = jnp.sin(angles)[:, None, :]
    rot = x[..., :rotary_dim].astype(jnp.float32)
    if config.rope_interleaved:
        first, second = rot[..., 0::2], rot[..., 1::2]
    else:
        first, second = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    out_first = first * cos - second * sin
    out_second = second * cos + first * sin
    if config.rope_interleaved:
        rotated = jnp.stack([out_first, out_second], axis=-1).reshape(rot.shape)
    else:
        rotated = jnp.concatenate([out_first, out_second], axis=-1)
    rotated = rotated.astype(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)
