"""W8A8 matmul (fp8 x fp8, int8 x int8) vs its float32 reference; its shape checks; CUDA lowering at GLM-4 shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import w8a8_matmul as w8
from pallas_kernels._interpret import gpu_interpret
from tests.kernels.conftest import assert_close

DTYPES = [jnp.float8_e4m3fn, jnp.int8]
DTYPE_IDS = ["fp8", "int8"]
# GLM-4-9B projections (K, N): qkv, o_proj, gate_up, down.
GLM4 = {"qkv": (4096, 4608), "o_proj": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}


def random_w8a8(m, k, n, dtype, seed):
    """Codes over the 8-bit range and positive per-row scales, fresh for every seed."""
    ka, kw, ksa, ksw = jax.random.split(jax.random.key(seed), 4)
    if jnp.dtype(dtype) == jnp.int8:
        a_q = jax.random.randint(ka, (m, k), -127, 128).astype(jnp.int8)
        w_q = jax.random.randint(kw, (n, k), -127, 128).astype(jnp.int8)
    else:
        a_q = jnp.clip(jax.random.normal(ka, (m, k), jnp.float32) * 100, -448, 448).astype(dtype)
        w_q = jnp.clip(jax.random.normal(kw, (n, k), jnp.float32) * 100, -448, 448).astype(dtype)
    a_scale = jax.random.uniform(ksa, (m,), jnp.float32, 0.5, 1.5) / 127
    w_scale = jax.random.uniform(ksw, (n,), jnp.float32, 0.5, 1.5) / (127 * k ** 0.5)
    return a_q, a_scale, w_q, w_scale


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,k,n,config,out_dtype", [
    (1, 512, 256, w8.W8A8MatmulConfig(tile_n=128, tile_k=128, num_stages=2, num_k_splits=2), jnp.bfloat16),
    (3, 640, 128, w8.W8A8MatmulConfig(tile_n=128, tile_k=128, num_stages=3, num_k_splits=2), jnp.float32),  # 5 steps: 3 + 2
    (16, 512, 128, None, jnp.bfloat16),
    (9, 256, 256, w8.W8A8MatmulConfig(tile_n=256, tile_k=256, num_stages=2), jnp.float32),  # M padded to 16, 128 rows/wg
    (100, 256, 128, None, jnp.bfloat16),  # M > 64 on the small-M kernel
    (150, 256, 256, None, jnp.float32),  # large M: XLA's GEMM on [N, K]
])
def test_matches_reference(dtype, m, k, n, config, out_dtype, kernel_context):
    a_q, a_scale, w_q, w_scale = random_w8a8(m, k, n, dtype, seed=m + n + k)
    with kernel_context():
        out = w8.w8a8_matmul(a_q, a_scale, w_q, w_scale, config=config, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    ref = w8.w8a8_matmul_reference(a_q, a_scale, w_q, w_scale)
    # Products of 8-bit codes are exact in f32; only summation order differs (bf16 output: its rounding).
    assert_close(out, ref, rel_tol=1e-2 if out_dtype == jnp.bfloat16 else 1e-5,
                 what=f"{jnp.dtype(dtype).name} {m}x{k}x{n}")


def test_int8_sums_are_exact(kernel_context):
    """int8 x int8 accumulates in int32 (split-K partials too): with unit scales the result is the exact integer."""
    a_q, _, w_q, _ = random_w8a8(5, 512, 128, jnp.int8, seed=7)
    ones_m, ones_n = jnp.ones((5,), jnp.float32), jnp.ones((128,), jnp.float32)
    config = w8.W8A8MatmulConfig(tile_n=128, tile_k=128, num_stages=2, num_k_splits=3)
    with kernel_context():  # on a GPU the real kernel (the interpreter needs a CPU device: JAX_PLATFORMS=cuda has none)
        out = w8.w8a8_matmul(a_q, ones_m, w_q, ones_n, config=config, out_dtype=jnp.float32)
    exact = np.asarray(a_q, np.int64) @ np.asarray(w_q, np.int64).T
    np.testing.assert_array_equal(np.asarray(out, np.float64), exact.astype(np.float64))


def test_rejects_bad_inputs():
    a_q, a_scale, w_q, w_scale = random_w8a8(2, 256, 128, jnp.float8_e4m3fn, seed=0)
    with pytest.raises(ValueError, match="one per output channel"):
        w8.w8a8_matmul(a_q, a_scale, w_q, w_scale[:64])
    with pytest.raises(ValueError, match="one scale per token"):
        w8.w8a8_matmul(a_q, a_scale[:1], w_q, w_scale)
    with pytest.raises(ValueError, match="contraction mismatch"):
        w8.w8a8_matmul(a_q, a_scale, w_q[:, :128], w_scale)
    with pytest.raises(ValueError, match="must both be one of"):
        w8.w8a8_matmul(a_q, a_scale, w_q.astype(jnp.int8), w_scale)
    with pytest.raises(ValueError, match="must both be one of"):
        w8.w8a8_matmul(a_q.astype(jnp.bfloat16), a_scale, w_q.astype(jnp.bfloat16), w_scale)
    with pytest.raises(ValueError, match=r"a_q must be \[M, K\]"):
        w8.w8a8_matmul(a_q[0], a_scale, w_q, w_scale)
    with pytest.raises(ValueError, match="out_dtype=float16"):
        w8.w8a8_matmul(a_q, a_scale, w_q, w_scale, out_dtype=jnp.float16)
    with pytest.raises(ValueError, match="must divide n=128"):
        w8.w8a8_matmul(a_q, a_scale, w_q, w_scale, config=w8.W8A8MatmulConfig(tile_n=256, tile_k=128))
    with pytest.raises(ValueError, match="multiple of 128"):
        w8.W8A8MatmulConfig(tile_k=64)
    with pytest.raises(ValueError, match="128 or 256"):
        w8.W8A8MatmulConfig(tile_n=64)


@pytest.mark.parametrize("m,k,n,dtype,out_dtype", [
    (1, 256, 128, jnp.float8_e4m3fn, jnp.bfloat16), (64, 256, 128, jnp.int8, jnp.float32),
    (1, 64, 128, jnp.float8_e4m3fn, jnp.bfloat16), (1, 256, 64, jnp.int8, jnp.bfloat16),
    (200, 64, 64, jnp.float8_e4m3fn, jnp.float32), (1, 256, 128, jnp.float8_e4m3fn, jnp.float16),
    (1, 256, 128, jnp.bfloat16, jnp.bfloat16)])
def test_supports_is_what_the_wrapper_accepts(m, k, n, dtype, out_dtype):
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((n, k), dtype), jax.ShapeDtypeStruct((n,), jnp.float32))
    try:
        with gpu_interpret():
            jax.eval_shape(lambda *a: w8.w8a8_matmul(*a, out_dtype=out_dtype), *args)
        accepted = True
    except ValueError:
        accepted = False
    assert w8.supports(m, k, n, dtype, out_dtype) == accepted


def test_default_config_fits_glm4_decode_shapes():
    with gpu_interpret():  # the abstract H100: its tuning table, else the heuristic
        for (k, n), m in ((kn, m) for kn in GLM4.values() for m in (1, 16, 64, 128)):
            assert w8.supports(m, k, n, jnp.float8_e4m3fn), (m, k, n, w8.default_config(m, k, n, jnp.float8_e4m3fn))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ["gate_up", "down"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_lowers_for_cuda_at_glm4_shapes(m, shape, dtype):
    """Mosaic GPU's layout inference and dialect lowering (on CPU) take 8-bit x 8-bit wgmma from SMEM
    at the default configs: the GPU interpreter does not check operand layouts or wgmma dtypes."""
    k, n = GLM4[shape]
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((n, k), dtype), jax.ShapeDtypeStruct((n,), jnp.float32))
    text = w8.w8a8_matmul.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(GLM4))
@pytest.mark.parametrize("m", [1, 16, 64])
def test_glm4_shapes_gpu(m, shape, dtype):
    k, n = GLM4[shape]
    args = random_w8a8(m, k, n, dtype, seed=m + k + n)
    out = w8.w8a8_matmul(*args, out_dtype=jnp.float32)
    # int8: exact int32 sums. fp8: wgmma accumulates with reduced precision inside an instruction chain (as
    # cuBLASLt's fast accumulation), expected well below 1e-3 relative; a wrong layout or tile is O(1).
    rel_tol = 1e-5 if jnp.dtype(dtype) == jnp.int8 else 5e-3
    assert_close(out, w8.w8a8_matmul_reference(*args), rel_tol=rel_tol, what=f"{shape} M={m}")
