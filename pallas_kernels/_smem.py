"""Shared-memory layout shared by the Mosaic GPU kernels.

Owns: the tiling + swizzle transform of an SMEM tile whose minor dimension is ``minor_dim`` elements
of ``dtype`` (the widest swizzle that row allows), so TMA copies and wgmma read it without bank
conflicts. Every kernel in this package builds its SMEM tiles with it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def smem_transforms(minor_dim: int, dtype):
    swizzle = plgpu.find_swizzle(minor_dim * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
