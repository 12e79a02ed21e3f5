"""Shared-memory layout shared by the Mosaic GPU kernels.

Owns: the tiling + swizzle transform of an SMEM tile whose minor dimension is ``minor_dim`` elements
of ``dtype`` (the widest swizzle that row allows; 4-bit types count half a byte per element), so TMA
copies and wgmma read it without bank conflicts. Every kernel in this package builds its SMEM tiles
with it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

_FOUR_BIT = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def bits(dtype) -> int:
    """Bits per element (numpy reports one byte for the 4-bit types)."""
    return 4 if jnp.dtype(dtype) in _FOUR_BIT else jnp.dtype(dtype).itemsize * 8


def smem_transforms(minor_dim: int, dtype):
    swizzle = plgpu.find_swizzle(minor_dim * bits(dtype))
    return plgpu.TilingTransform((8, swizzle * 8 // bits(dtype))), plgpu.SwizzleTransform(swizzle)
