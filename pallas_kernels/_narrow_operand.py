"""8-bit weights (int8, fp8-e4m3) as the f16 wgmma A operand in registers, converted without moving data between threads.

Owns: ``upcast_operand`` (SMEM [R, C] int8 | fp8 -> registers [R, C] f16 in the wgmma A layout), the token format it
multiplies (``operand_tokens``: f16, scaled by ``TOKEN_SCALE``, K in the operand's order) and that K order,
``swap_k_bits`` (applied to the tokens by the kernel's wrapper, and to the tile by the interpreter's path).

Why 4 bytes a thread: loaded straight into the wgmma A layout, each thread holds 2-byte pairs of an 8-bit tile
(columns 2c, 2c+1 and 2c+8, 2c+9 of every 16), so it reads SMEM two bytes at a time and packs every pair before
converting it (ncu, H200, int8 [27392, 4096] at M = 8: 4.2 instructions per weight, 2.95 TB/s). Loaded in Mosaic
GPU's ``WGMMA_UPCAST_2X`` layout instead, a thread reads 4 consecutive bytes (columns s0..s0+3 of every 16, s0 = 0,
8, 4, 12 for c = lane % 4) and converts them as one 32-bit register. Those 4 values are then used, as they lie, as
the thread's wgmma pairs: columns (2c, 2c+1) and (2c+8, 2c+9). So operand column o holds weight column
swap_k_bits(o), where swap_k_bits exchanges bits 1 and 3 of the index within each 16 (an involution). Multiplying
by tokens whose K axis went through the same swap gives exactly a @ w^T.

Why f16: int8 -> f16 is exact and cheap (a byte under the f16 exponent of 1024 is 1024 + u: one XOR per 4 weights,
then a PRMT and an f16x2 subtract per pair, against bf16's PRMT, two LOP3 and a subtract per pair: bf16's 7-bit
mantissa cannot hold a byte), and fp8-e4m3 -> f16 is one cvt per pair (bf16 goes through f32). The tokens, bf16,
become f16 times 2^-8: exact for |a| in [2^-8, 1.6e7] (f16's 11 bits hold bf16's 8; 2^-8 moves bf16's large
values under f16's 65504), within 2^-17 absolute below (f16 subnormals); the kernel's sums are multiplied back
by 2^8 in the f32 epilogue (exact).

Only the GPU lowers the register path (``inline_mgpu``); the GPU interpreter loads the tile as it is, converts it
to f16 and applies ``swap_k_bits``, so CPU tests check the wrapper's token order against the operand order the GPU
builds, and ``tests/kernels/test_narrow_operand.py`` checks the register renaming against jax's layouts.
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir  # the MLIR bindings Mosaic GPU builds with (not a private jax module)

K_BLOCK = 16  # the permutation acts within each 16 consecutive K
OPERAND_DTYPE = jnp.dtype(jnp.float16)
LOAD_LAYOUT = plgpu.Layout.WGMMA_UPCAST_2X  # the layout the 8-bit tile is loaded in before ``upcast_operand``
TOKEN_SCALE = 2.0 ** -8  # tokens enter f16 times this (a power of two: exact); the sums are divided by it
# int8 -> f16 of one 32-bit register of 4 weights (bytes b0..b3) into two f16x2 registers ($0: b0, b1; $1: b2, b3):
# u = b ^ 0x80 is the weight + 128; f16 0x64uu = 1024 + u; minus 1152 (0x6480) = the weight, exactly.
_INT8_TO_F16X2 = """{
.reg .b32 u, bias;
xor.b32 u, $2, 0x80808080;
mov.b32 bias, 0x64806480;
prmt.b32 $0, u, 0x64646464, 0x4140;
prmt.b32 $1, u, 0x64646464, 0x4342;
sub.f16x2 $0, $0, bias;
sub.f16x2 $1, $1, bias;
}"""


def swap_k_bits(x):
    """x [..., K] (K a multiple of 16) with its last axis permuted: index bits 1 and 3 swapped within each 16."""
    *lead, k = x.shape
    if k % K_BLOCK:
        raise ValueError(f"K={k} must be a multiple of {K_BLOCK}")
    blocks = x.reshape(*lead, k // K_BLOCK, 2, 2, 2, 2)  # bits 3, 2, 1, 0 of the index within the block
    n = blocks.ndim
    return blocks.transpose(*range(n - 4), n - 2, n - 3, n - 4, n - 1).reshape(*lead, k)


def operand_tokens(a):
    """a [M, K] bf16 -> [M, K] f16: the tokens the register-path operand multiplies (times ``TOKEN_SCALE``, K in the
    operand's order). The kernel's sums over them are ``TOKEN_SCALE`` times the true ones."""
    return swap_k_bits((a.astype(jnp.float32) * TOKEN_SCALE).astype(OPERAND_DTYPE))


def operand_register(idx: tuple[int, ...], half: int) -> tuple[int, ...]:
    """The wgmma-layout register index that takes elements [2 * half, 2 * half + 2) of the ``LOAD_LAYOUT`` register
    at ``idx``: [row tiles, 16-column tiles, ..., row half, ...] -> [row tiles, 8-column tiles, ..., row half, ...]
    (the load layout's register index has one more, trailing, dimension)."""
    return (idx[0], 2 * idx[1] + half, *idx[2:-1])


def upcast_operand(w):
    """w [R, C] int8 | float8_e4m3fn in ``LOAD_LAYOUT`` (R a multiple of 64, C of 16) -> [R, C] f16 in the wgmma
    A layout, whose column o is w's column swap_k_bits(o). Each thread converts its own registers; nothing moves."""
    shape, dtype = tuple(w.shape), jnp.dtype(w.dtype)

    @plgpu.inline_mgpu(arg_types=(LOAD_LAYOUT,),
                       return_type=plgpu.ShapeDtypeStruct(shape, OPERAND_DTYPE, layout=plgpu.Layout.WGMMA))
    def upcast(_, x):
        f16, i32 = ir.F16Type.get(), ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), f16)
        if dtype == jnp.int8:
            def pairs(reg):  # vector<4 x i8> -> two vector<2 x f16>
                lo, hi = mgpu_utils.inline_ptx(_INT8_TO_F16X2, mgpu_utils.bitcast(reg, i32), result_types=(i32, i32))
                return mgpu_utils.bitcast(lo, pair), mgpu_utils.bitcast(hi, pair)
        else:  # one cvt.rn.f16x2.e4m3x2 a pair
            x = x.astype(f16)

            def pairs(reg):  # vector<4 x f16> -> two vector<2 x f16>
                return mgpu_utils.vector_slice(reg, slice(0, 2)), mgpu_utils.vector_slice(reg, slice(2, 4))
        # UPCAST_2X registers of 4 -> WGMMA registers of 2: the first pair in 8-column tile 2t, the second in 2t + 1
        out = np.empty(fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
        for idx, reg in np.ndenumerate(x.registers):
            for half, value in enumerate(pairs(reg)):
                out[operand_register(idx, half)] = value
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return upcast(w)
