"""8-bit weights (int8, fp8-e4m3) as the bf16 wgmma A operand in registers, converted without moving data between threads.

Owns: ``upcast_operand`` (SMEM [R, C] int8 | fp8 -> registers [R, C] bf16 in the wgmma A layout) and the K order it
implies, ``swap_k_bits`` (applied to the tokens by the kernel's wrapper, and to the tile by the interpreter's path).

Why: loaded straight into the wgmma A layout, each thread holds 2-byte pairs of an 8-bit tile (columns 2c, 2c+1
and 2c+8, 2c+9 of every 16), so it reads SMEM two bytes at a time and packs every pair before converting it (ncu, H200,
int8 [27392, 4096] at M = 8: 4.2 instructions per weight, 2.95 TB/s). Loaded in Mosaic GPU's ``WGMMA_UPCAST_2X``
layout instead, a thread reads 4 consecutive bytes (columns s0..s0+3 of every 16, s0 = 0, 8, 4, 12 for
c = lane % 4) and converts them as one 32-bit register. Those 4 bf16 are then used, as they lie, as the thread's
wgmma pairs: columns (2c, 2c+1) and (2c+8, 2c+9). So operand column o holds weight column swap_k_bits(o), where
swap_k_bits exchanges bits 1 and 3 of the index within each 16 (an involution). Multiplying by tokens whose K
axis went through the same swap gives exactly a @ w^T.

Only the GPU lowers this (``inline_mgpu``); the GPU interpreter loads the tile as it is and applies
``swap_k_bits`` to it, so CPU tests check the wrapper's token order against the operand order the GPU builds.
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir  # the MLIR bindings Mosaic GPU builds with (not a private jax module)

K_BLOCK = 16  # the permutation acts within each 16 consecutive K


def swap_k_bits(x):
    """x [..., K] (K a multiple of 16) with its last axis permuted: index bits 1 and 3 swapped within each 16."""
    *lead, k = x.shape
    if k % K_BLOCK:
        raise ValueError(f"K={k} must be a multiple of {K_BLOCK}")
    blocks = x.reshape(*lead, k // K_BLOCK, 2, 2, 2, 2)  # bits 3, 2, 1, 0 of the index within the block
    n = blocks.ndim
    return blocks.transpose(*range(n - 4), n - 2, n - 3, n - 4, n - 1).reshape(*lead, k)


def operand_register(idx: tuple[int, ...], half: int) -> tuple[int, ...]:
    """The wgmma-layout register index that takes elements [2 * half, 2 * half + 2) of the ``load_layout()`` register
    at ``idx``: [row tiles, 16-column tiles, ..., row half, ...] -> [row tiles, 8-column tiles, ..., row half, ...]
    (the load layout's register index has one more, trailing, dimension)."""
    return (idx[0], 2 * idx[1] + half, *idx[2:-1])


def load_layout():
    """The layout to load the 8-bit tile in before ``upcast_operand``."""
    return plgpu.Layout.WGMMA_UPCAST_2X


def upcast_operand(w):
    """w [R, C] int8 | float8_e4m3fn in ``load_layout()`` (R a multiple of 64, C of 16) -> [R, C] bf16 in the wgmma
    A layout, whose column o is w's column swap_k_bits(o). Each thread converts its own registers; nothing moves."""
    shape, dtype = tuple(w.shape), jnp.dtype(w.dtype)

    @plgpu.inline_mgpu(arg_types=(load_layout(),),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA))
    def upcast(_, x):
        bf16 = ir.BF16Type.get()
        if dtype == jnp.int8:
            y = fa.FragmentedArray(_registers=x.registers, _layout=x.layout, _is_signed=True).astype(bf16)
        else:  # Hopper converts fp8 only to f16 / f32 (with this ptxas): via f32, as the pair cvt packs to bf16
            y = x.astype(ir.F32Type.get()).astype(bf16)
        # UPCAST_2X registers of 4 bf16 -> WGMMA registers of 2: the first pair in 8-column tile 2t, the second in 2t + 1
        out = np.empty(fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
        for idx, reg in np.ndenumerate(y.registers):
            for half in range(2):
                out[operand_register(idx, half)] = mgpu_utils.vector_slice(reg, slice(2 * half, 2 * half + 2))
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return upcast(w)
