"""Weight-only int4 matmul with group scales vs its float32 reference (dequantize, then matmul); the register
path lowered for CUDA on CPU at GLM-4-9B shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import int4_matmul as i4
from pallas_kernels._interpret import gpu_interpret
from tests.kernels.conftest import assert_close

Config = i4.Int4MatmulConfig


def random_int4(m, k, n, group_size, seed, offsets=True):
    """a [M, K] bf16, codes [G, N, g] int4 over the whole [-8, 7], scales [G, N] > 0, offsets [G, N] of
    either sign (an asymmetric grid's scale * (8 - zero)), sized so the outputs are O(1)."""
    ka, kc, ks, ko = jax.random.split(jax.random.key(seed), 4)
    groups = k // group_size
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.bfloat16)
    codes = jax.random.randint(kc, (groups, n, group_size), -8, 8).astype(jnp.int4)
    scales = jax.random.uniform(ks, (groups, n), jnp.float32, 0.5, 1.5) / (5 * k ** 0.5)
    offs = jax.random.randint(ko, (groups, n), -7, 8).astype(jnp.float32) * scales if offsets else None
    return a, codes, scales, offs


@pytest.mark.parametrize("m,k,n,group_size,config", [
    (1, 512, 256, 64, Config(tile_k=128, num_stages=2, num_k_splits=2)),    # 2 groups per step, split-K
    (1, 640, 128, 128, Config(tile_k=128, num_stages=3, num_k_splits=2)),   # 5 steps: 3 + 2
    (16, 768, 128, 64, Config(tile_k=256, num_stages=2, num_k_splits=2)),   # 4 groups per step, 3 steps: 2 + 1
    (16, 384, 256, 128, None),                                              # heuristic
    (40, 1024, 128, 64, Config(tile_k=512, num_stages=2, num_k_splits=2)),  # 8 groups a step, 2 wgmmas in flight
    (5, 256, 256, 64, Config(tile_n=256, tile_k=64, num_stages=2)),         # M padded to 8
    (9, 256, 256, 128, Config(tile_n=256, tile_k=128, num_stages=2)),       # 128 rows per warpgroup
    (100, 384, 128, 128, None),                                             # M > 64 on the small-M kernel
    (150, 256, 256, 64, None),                                              # large M: dequantize + prefill kernel
])
def test_matches_reference(m, k, n, group_size, config, kernel_context):
    a, codes, scales, offsets = random_int4(m, k, n, group_size, seed=m + k + n)
    with kernel_context():
        out = i4.int4_matmul(a, codes, scales, offsets, config=config)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    assert_close(out, i4.int4_matmul_reference(a, codes, scales, offsets), what=f"int4 g{group_size} {m}x{k}x{n}")


def test_float32_output_and_no_offsets(kernel_context):
    a, codes, scales, _ = random_int4(3, 256, 128, 128, seed=3, offsets=False)
    with kernel_context():
        out = i4.int4_matmul(a, codes, scales, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert_close(out, i4.int4_matmul_reference(a, codes, scales), rel_tol=1e-5, what="f32 out, symmetric")


def test_rejects_bad_shapes():
    a, codes, scales, offsets = random_int4(2, 256, 128, 64, seed=0)
    with pytest.raises(ValueError, match="contraction mismatch"):
        i4.int4_matmul(a[:, :128], codes, scales, offsets)
    with pytest.raises(ValueError, match="scales must be float32"):
        i4.int4_matmul(a, codes, scales[:2], offsets)
    with pytest.raises(ValueError, match="offsets must be float32"):
        i4.int4_matmul(a, codes, scales, offsets.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="must be int4"):
        i4.int4_matmul(a, codes.astype(jnp.int8), scales, offsets)
    with pytest.raises(ValueError, match="codes"):
        i4.int4_matmul(a, codes.reshape(-1, 64), scales, offsets)
    codes32, scales32 = codes.reshape(8, 128, 32), jnp.repeat(scales, 2, axis=0)
    with pytest.raises(ValueError, match="group size 32 must be one of"):
        i4.int4_matmul(a, codes32, scales32)
    with pytest.raises(ValueError, match="multiple of the group size 128"):
        i4.int4_matmul(a, codes.reshape(2, 128, 128), scales[:2], config=Config(tile_k=64))
    with pytest.raises(ValueError, match="bfloat16 only"):
        i4.int4_matmul(jnp.ones((200, 256), jnp.bfloat16), codes, scales, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="must divide n=128"):
        i4.int4_matmul(a, codes, scales, config=Config(tile_n=256))
    with pytest.raises(ValueError, match="multiple of 128"):  # two warpgroups of >= 64-row wgmmas
        i4.int4_matmul(a, codes, scales, config=Config(tile_n=64))


@pytest.mark.parametrize("m,k,n,group_size,out_dtype", [
    (1, 256, 128, 64, None), (1, 256, 128, 128, jnp.float32), (1, 192, 128, 64, None), (1, 192, 128, 128, None),
    (1, 256, 64, 64, None), (1, 256, 128, 32, None), (200, 256, 256, 128, None), (200, 256, 256, 128, jnp.float32)])
def test_supports_is_what_the_wrapper_accepts(m, k, n, group_size, out_dtype):
    groups = max(k // group_size, 1)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((groups, n, group_size), jnp.int4),
            jax.ShapeDtypeStruct((groups, n), jnp.float32))
    try:
        with gpu_interpret():
            jax.eval_shape(lambda a, c, s: i4.int4_matmul(a, c, s, s, out_dtype=out_dtype), *args)
        accepted = True
    except ValueError:
        accepted = False
    assert i4.supports(m, k, n, jnp.bfloat16, group_size, out_dtype) == accepted


GLM4_INT4 = [(4096, 27392), (13696, 4096)]  # gate_up, down


@pytest.mark.parametrize("group_size", i4.GROUP_SIZES)
@pytest.mark.parametrize("k,n", GLM4_INT4, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16])
def test_register_path_lowers_for_cuda_at_glm4_shapes(m, k, n, group_size):
    """Outside the interpreter the codes go SMEM -> registers -> bf16 wgmma operand; Mosaic GPU's layout
    inference and dialect lowering (which run here, on CPU) must take that for the default configs."""
    groups = k // group_size
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((groups, n, group_size), jnp.int4),
            jax.ShapeDtypeStruct((groups, n), jnp.float32), jax.ShapeDtypeStruct((groups, n), jnp.float32))
    text = i4.int4_matmul.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", i4.GROUP_SIZES)
@pytest.mark.parametrize("k,n", GLM4_INT4, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16, 64])
def test_glm4_shapes_gpu(m, k, n, group_size):
    a, codes, scales, offsets = random_int4(m, k, n, group_size, seed=m + k)
    assert_close(i4.int4_matmul(a, codes, scales, offsets), i4.int4_matmul_reference(a, codes, scales, offsets),
                 what=f"int4 g{group_size} {m}x{k}x{n}")
