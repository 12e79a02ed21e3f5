"""bf16 Tensor-Core matmul vs its float32 reference (interpreter on CPU, compiled on GPU); the large-M
kernel's split-K heuristic, its config checks and its CUDA lowering at GLM-4-9B shapes (on CPU)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import matmul as mm
from pallas_kernels import tuning
from tests.kernels.conftest import assert_close


def random_operands(m, k, n, seed):
    ka, kw = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    return a, w


@pytest.mark.parametrize("m,k,n,config", [
    (1, 256, 256, mm.MatmulConfig(tile_n=128, tile_k=64, num_stages=2, num_k_splits=2)),  # decode, split-K
    (3, 448, 128, mm.MatmulConfig(tile_n=128, tile_k=64, num_stages=2, num_k_splits=3)),  # 7 K steps in 3 splits
    (37, 512, 128, None),                                                                 # odd M, heuristic
    (100, 256, 256, mm.MatmulConfig(tile_n=256, tile_k=64, num_stages=2)),                # M > 64 small path
    (200, 128, 512, mm.MatmulConfig(tile_m=128, tile_n=128, tile_k=64, num_stages=2)),    # prefill path, padded M
    # prefill split-K (CTAs loop over (split, tile) items; f32 partial sums added in XLA; the interpreter
    # NaN-fills the output, so a partial sum never written shows): 3 x 2 tiles of 64 x 128, 7 K steps in
    # splits of 3, 3, 1 (the last skips two clamped steps); padded M (200 -> 256), 5 K steps as 3, 2
    (192, 448, 256, mm.MatmulConfig(tile_m=64, tile_n=64, tile_k=64, num_stages=2, num_k_splits=3)),
    (200, 320, 256, mm.MatmulConfig(tile_m=128, tile_n=64, tile_k=64, num_stages=3, num_k_splits=2)),
])
def test_matches_reference(m, k, n, config, kernel_context):
    a, w = random_operands(m, k, n, seed=m * 7 + n)
    with kernel_context():
        out = mm.matmul(a, w, config=config)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    assert_close(out, mm.matmul_reference(a, w), what=f"matmul {m}x{k}x{n}")


def test_rejects_bad_shapes():
    a, w = random_operands(4, 128, 128, seed=0)
    with pytest.raises(ValueError, match="contraction mismatch"):
        mm.matmul(a, w[:64])
    with pytest.raises(ValueError, match="must divide n=192"):
        mm.matmul(a, jnp.ones((128, 192), jnp.bfloat16), config=mm.MatmulConfig(tile_n=128))
    with pytest.raises(ValueError, match="bfloat16"):
        mm.matmul(a.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="multiple of 64"):
        mm.MatmulConfig(tile_k=48)
    with pytest.raises(ValueError, match="multiple of 128"):  # small M: two warpgroups of >= 64 rows
        mm.matmul(a, w, config=mm.MatmulConfig(tile_n=64))
    with pytest.raises(ValueError, match="bytes of SMEM"):
        mm.matmul(a, w, config=mm.MatmulConfig(tile_n=128, tile_k=128, num_stages=8))


GLM4_PROJECTIONS = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096), (4096, 151552)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", GLM4_PROJECTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_glm4_shapes_gpu(m, k, n):
    if m == 4096 and n == 151552:
        pytest.skip("lm_head is applied to sampled rows only, never 4096 at once")
    a, w = random_operands(m, k, n, seed=m + k + n)
    assert_close(mm.matmul(a, w), mm.matmul_reference(a, w), what=f"matmul {m}x{k}x{n}")


GLM4_DOWN = (13696, 4096)


def test_large_m_heuristic_splits_k_when_tiles_leave_sms_idle(monkeypatch):
    monkeypatch.setattr(tuning, "num_sms", lambda: 132)
    k, n = GLM4_DOWN  # M=256: 2 x 16 tiles of 128 x 256 for 132 SMs
    config = mm.MatmulConfig(**mm.large_m_heuristic(256, k, n))
    items = pl.cdiv(256, config.tile_m) * n // (2 * config.tile_n) * config.num_k_splits
    assert config.num_k_splits > 1 and 132 // 2 <= items <= 132, config  # splits fill one wave of the SMs
    assert mm.large_m_shape_error(256, k, n, config) is None
    assert mm.large_m_heuristic(4096, k, n) == dict(tile_m=128, tile_n=128, tile_k=64, num_stages=4, num_k_splits=1)
    assert mm.large_m_heuristic(192, k, n)["tile_m"] == 64  # pads M less than 128-row tiles
    for (k, n), m in itertools.product(GLM4_PROJECTIONS, (129, 192, 256, 512, 1024, 4096)):
        assert mm.large_m_shape_error(m, k, n, mm.MatmulConfig(**mm.large_m_heuristic(m, k, n))) is None, (m, k, n)
    assert mm.MatmulConfig(**mm.large_m_heuristic(300, 100, 96))  # a shape the kernel rejects: still a config


def test_large_m_rejects_bad_configs():
    a, w = random_operands(192, 320, 256, seed=1)  # 5 K steps of 64
    config = functools.partial(mm.MatmulConfig, tile_m=64, tile_n=64, tile_k=64, num_stages=2)
    with pytest.raises(ValueError, match=r"split-K: config.num_k_splits=6 exceeds the 5 K steps"):
        mm.matmul(a, w, config=config(num_k_splits=6))
    with pytest.raises(ValueError, match=r"split-K: config.num_k_splits=4 .* ranges of 2 steps, leaving the last"):
        mm.matmul(a, w, config=config(num_k_splits=4))  # 2 + 2 + 1 + 0 steps
    with pytest.raises(ValueError, match=r"2 \* config.tile_n=256 must divide n=256"):
        mm.matmul(a, w, config=config(tile_n=256))
    with pytest.raises(ValueError, match="bytes of SMEM"):
        mm.matmul(a, w, config=config(tile_m=128, tile_n=128, tile_k=64, num_stages=5))
    with pytest.raises(ValueError, match="bfloat16 only"):
        mm.matmul(a, w, config=config(num_k_splits=2), out_dtype=jnp.float32)


@pytest.mark.parametrize("m", [256, 4096])
@pytest.mark.parametrize("k,n", GLM4_PROJECTIONS[:4], ids=lambda v: str(v))
def test_large_m_lowers_for_cuda_at_glm4_shapes(m, k, n, monkeypatch):
    """Mosaic GPU's layout inference and lowering (on CPU) take the heuristic configs for an H100's 132 SMs
    (passed explicitly: the tuning table's entries for the card override the heuristic in default_config):
    at M=256 split-K with f32 epilogue pieces of 64 x 32 (the GPU interpreter does not check register
    layouts), at 4096 one split with bf16 pieces."""
    monkeypatch.setattr(tuning, "num_sms", lambda: 132)
    config = mm.MatmulConfig(**mm.large_m_heuristic(m, k, n))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.bfloat16))
    text = mm.matmul.trace(*args, config=config).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    splits = config.num_k_splits
    assert (splits > 1) == (m == 256 and n != 27392)  # gate_up at M=256: 2 x 107 tiles fill the SMs
    assert (f"tensor<{splits}x{m}x{n}xf32>" in text) == (splits > 1)
