"""Weight-only int8 / fp8-e4m3 matmul vs its float32 reference (dequantize, then matmul)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import quantized_matmul as qm
from tests.kernels.conftest import assert_close


def random_quantized(m, k, n, weight_dtype, seed):
    ka, kw, ks = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.bfloat16)
    if jnp.dtype(weight_dtype) == jnp.int8:
        w_q = jax.random.randint(kw, (n, k), -127, 128).astype(jnp.int8)
    else:
        w_q = (jax.random.normal(kw, (n, k), jnp.float32) * 64).astype(weight_dtype)
    scale = jax.random.uniform(ks, (n,), jnp.float32, 0.5, 1.5) / (127 * k ** 0.5)
    return a, w_q, scale


@pytest.mark.parametrize("weight_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("m,k,n,config", [
    (1, 512, 256, qm.QuantizedMatmulConfig(tile_n=128, tile_k=128, num_stages=2, num_k_splits=2)),
    (2, 640, 128, qm.QuantizedMatmulConfig(tile_n=128, tile_k=128, num_stages=3, num_k_splits=2)),  # 5 steps: 3 + 2
    (16, 256, 128, None),
    (9, 256, 256, qm.QuantizedMatmulConfig(tile_n=256, tile_k=128, num_stages=2)),  # M padded to 16, 128 rows/wg
    (4, 384, 256, qm.QuantizedMatmulConfig(tile_n=128, tile_k=128, num_stages=2, num_k_splits=2)),
    (8, 512, 256, qm.QuantizedMatmulConfig(tile_n=128, tile_k=256, num_stages=2)),  # 2 K chunks a step
    (5, 1152, 128, qm.QuantizedMatmulConfig(tile_n=128, tile_k=384, num_stages=2, num_k_splits=2)),  # 3 chunks, 2 + 1 steps
    (100, 384, 128, None),  # M > 64 on the small-M kernel
    (150, 128, 256, None),  # large M: dequantize + bf16 prefill kernel
])
def test_matches_reference(weight_dtype, m, k, n, config, kernel_context):
    a, w_q, scale = random_quantized(m, k, n, weight_dtype, seed=m + n)
    with kernel_context():
        out = qm.quantized_matmul(a, w_q, scale, config=config)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    assert_close(out, qm.quantized_matmul_reference(a, w_q, scale), what=f"{jnp.dtype(weight_dtype).name} {m}x{k}x{n}")


def test_rejects_bad_shapes():
    a, w_q, scale = random_quantized(2, 256, 128, jnp.int8, seed=0)
    with pytest.raises(ValueError, match="one scale per output channel"):
        qm.quantized_matmul(a, w_q, scale[:64])
    with pytest.raises(ValueError, match="contraction mismatch"):
        qm.quantized_matmul(a, w_q[:, :128], scale)
    with pytest.raises(ValueError, match="w_q dtype"):
        qm.quantized_matmul(a, w_q.astype(jnp.bfloat16), scale)
    with pytest.raises(ValueError, match="multiple of 128"):
        qm.QuantizedMatmulConfig(tile_k=64)
    with pytest.raises(ValueError, match="128 or 256"):
        qm.QuantizedMatmulConfig(tile_n=64)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_glm4_gate_up_gpu(weight_dtype, m):
    a, w_q, scale = random_quantized(m, 4096, 27392, weight_dtype, seed=m)
    assert_close(qm.quantized_matmul(a, w_q, scale), qm.quantized_matmul_reference(a, w_q, scale), what="gate_up")


@pytest.mark.parametrize("splits", [1, 2])
def test_split_sums_are_their_own_fusion(splits, kernel_context):
    """With split-K the partial sums are added behind an optimization barrier (``matmul.small_m_result``): XLA
    must not fuse that sum into the consumers (an RMSNorm's single-block reduction re-read all S partials)."""
    a, w_q, scale = random_quantized(1, 512, 256, jnp.int8, seed=3)
    config = qm.QuantizedMatmulConfig(tile_n=128, tile_k=128, num_stages=2, num_k_splits=splits)
    consumer = jax.jit(lambda a, w, s: jnp.sum(qm.quantized_matmul(a, w, s, config=config).astype(jnp.float32) ** 2))
    with kernel_context():
        text = consumer.lower(a, w_q, scale).as_text()
        out = consumer(a, w_q, scale)
    assert ("optimization_barrier" in text) == (splits > 1)
    ref = jnp.sum(qm.quantized_matmul_reference(a, w_q, scale).astype(jnp.bfloat16).astype(jnp.float32) ** 2)
    assert_close(out, ref, what=f"sum of squares, {splits} splits")
