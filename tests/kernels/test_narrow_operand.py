"""The 8-bit wgmma operand's K order: the register reinterpretation of ``_narrow_operand`` against jax's layouts.

The GPU interpreter cannot run ``inline_mgpu``, so the register path is checked here by simulating which logical
element each thread holds in Mosaic GPU's layouts (their tilings, warp / lane / vector dimensions) and following
``operand_register``'s moves; the kernel built on it is checked against its reference on the GPU
(``tests/kernels/test_quantized_matmul.py``) and lowered for CUDA here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import fragmented_array as fa

from pallas_kernels import _narrow_operand as narrow
from pallas_kernels import quantized_matmul as qm


def swap_bits_1_3(o: int) -> int:
    return o & ~0b1010 | (o >> 3 & 1) << 1 | (o >> 1 & 1) << 3


def test_swap_k_bits_permutes_each_16_by_swapping_index_bits_1_and_3():
    x = jnp.arange(3 * 64).reshape(3, 64)
    out = np.asarray(narrow.swap_k_bits(x))
    expected = np.array([[row * 64 + block * 16 + swap_bits_1_3(o) for block in range(4) for o in range(16)]
                         for row in range(3)])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.asarray(narrow.swap_k_bits(jnp.asarray(out))), np.asarray(x))  # an involution
    with pytest.raises(ValueError, match="multiple of 16"):
        narrow.swap_k_bits(jnp.zeros((2, 24)))


def test_operand_tokens_are_exact_over_the_documented_range():
    """f16 x 2^-8 holds every bf16 token with |a| in [2^-8, 1.6e7] exactly, and smaller ones within 2^-17."""
    magnitudes = jnp.logspace(-8, 23, 4096, base=2.0)  # 2^-8 .. 2^23 (> 1.6e7 is 2^23.9)
    signs = jnp.where(jnp.arange(4096) % 2 == 0, 1.0, -1.0)
    a = (magnitudes * signs).astype(jnp.bfloat16).reshape(4, 1024)
    back = narrow.swap_k_bits(narrow.operand_tokens(a).astype(jnp.float32) / narrow.TOKEN_SCALE)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(a.astype(jnp.float32)))
    tiny = (jax.random.normal(jax.random.key(0), (2, 64)) * 2.0 ** -12).astype(jnp.bfloat16)
    back = narrow.swap_k_bits(narrow.operand_tokens(tiny).astype(jnp.float32) / narrow.TOKEN_SCALE)
    assert float(jnp.max(jnp.abs(back - tiny.astype(jnp.float32)))) <= 2.0 ** -17


def held_elements(layout, shape):
    """{(warp, lane, register index, vector position): (row, column)} of a TiledLayout over ``shape``, from its
    tiling (each tile splits the trailing dims into (outer, tile)) and the warp / lane / vector dimensions."""
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    tiled = np.stack([rows, cols], axis=-1)  # [..., 2]: the logical index of each element
    for tile in layout.tiling.tiles:
        lead, dims = tiled.shape[:-1 - len(tile)], tiled.shape[-1 - len(tile):-1]
        split = tiled.reshape(*lead, *[s for d, t in zip(dims, tile) for s in (d // t, t)], 2)
        n = len(lead)
        order = [*range(n), *(n + 2 * i for i in range(len(tile))), *(n + 2 * i + 1 for i in range(len(tile)))]
        tiled = split.transpose(*order, split.ndim - 1)
    rank = tiled.ndim - 1
    norm = lambda d: d % rank
    warp_dims, lane_dims, vector_dim = [norm(d) for d in layout.warp_dims], [norm(d) for d in layout.lane_dims], \
        norm(layout.vector_dim)
    held = {}
    for idx in np.ndindex(*tiled.shape[:-1]):
        linear = lambda dims: int(np.ravel_multi_index([idx[d] for d in dims], [tiled.shape[d] for d in dims]))
        register = tuple(0 if d in (*warp_dims, *lane_dims, vector_dim) else i for d, i in enumerate(idx))
        held[(linear(warp_dims), linear(lane_dims), register, idx[vector_dim])] = tuple(tiled[idx])
    return held


@pytest.mark.parametrize("shape", [(64, 16), (64, 128), (128, 256)])
def test_register_reinterpretation_reads_weight_column_swap_k_bits_of_each_operand_column(shape):
    loaded = held_elements(fa.WGMMA_LAYOUT_UPCAST_2X, shape)
    operand = held_elements(fa.WGMMA_LAYOUT, shape)
    assert fa.WGMMA_LAYOUT_UPCAST_2X.registers_shape(shape)[:-1] == \
        tuple(s // 2 if d == 1 else s for d, s in enumerate(fa.WGMMA_LAYOUT.registers_shape(shape)))
    moved = 0
    for (warp, lane, register, position), (row, stored_col) in loaded.items():
        half, pair_position = divmod(position, 2)
        target = (warp, lane, narrow.operand_register(register, half), pair_position)
        op_row, op_col = operand[target]  # the operand element this register slot stands for
        assert op_row == row
        assert stored_col == op_col - op_col % 16 + swap_bits_1_3(op_col % 16)
        moved += 1
    assert moved == len(operand) == shape[0] * shape[1]


@pytest.mark.parametrize("weight_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 27392), (16, 4096, 4608), (8, 13696, 4096)])
def test_register_path_lowers_for_cuda_at_glm4_shapes(m, k, n, weight_dtype):
    """Outside the interpreter the weights go SMEM -> registers (4 bytes a thread) -> f16 wgmma operand; Mosaic GPU's
    layout inference and dialect lowering (which run here, on CPU) must take that for the tabled / default configs."""
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), weight_dtype),
            jax.ShapeDtypeStruct((n,), jnp.float32))
    text = qm.quantized_matmul.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
