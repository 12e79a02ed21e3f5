"""W8A8 weights under matmul_backend: every backend stores them [N, K] on a GPU; "auto" / "pallas" run
``pallas_kernels.w8a8_matmul`` at decode sizes and XLA's 8-bit GEMM on [N, K] otherwise, "xla" only the
latter, all with the [K, N] ChannelWeight rule's numerics up to summation order (tiny GLM-4 and Llama,
w8a8-fp8 / w8a8-int8). Without a GPU the kernel runs in the Mosaic GPU interpreter; a recorder checks
that it really ran."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.model.layers import linear
from autoglm_jax.model.matmul_backend import PallasW8A8Weight, apply_matmul_backend, wrap_weight
from autoglm_jax.quant.channel import ChannelWeight, quantize_channel
from pallas_kernels import w8a8_matmul as w8mm
from pallas_kernels._interpret import gpu_interpret
from tests.hf_tiny import save_tiny
from tests.test_matmul_backend import PROMPT, TINY, _greedy_logits, kernel_context

PROJECTIONS = ("qkv", "o", "gate_up", "down")


@pytest.fixture
def w8a8_calls(monkeypatch):
    """[(a_q.shape, a_q dtype, w_q.shape)] of every w8a8_matmul traced during the test."""
    calls = []

    def record(a_q, a_scale, w_q, *args, _kernel=w8mm.w8a8_matmul, **kwargs):
        calls.append((tuple(a_q.shape), jnp.dtype(a_q.dtype).name, tuple(w_q.shape)))
        return _kernel(a_q, a_scale, w_q, *args, **kwargs)

    monkeypatch.setattr(w8mm, "w8a8_matmul", record)
    return calls


def _w8a8(seed, k, n, activations):
    w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32) * 0.05
    return quantize_channel(w, "int8" if activations == "int8" else "fp8", activations=activations)


def _close(out, ref, rel):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.linalg.norm(out - ref) <= rel * np.linalg.norm(ref), (np.abs(out - ref).max(), np.abs(ref).max())


@pytest.mark.parametrize("activations", ["fp8", "int8"])
def test_one_weight_kernel_at_decode_sizes_xla_on_nk_elsewhere(w8a8_calls, activations):
    q = _w8a8(0, 256, 384, activations)
    wrapped = wrap_weight(q)
    assert isinstance(wrapped, PallasW8A8Weight) and wrapped.values_t.shape == (384, 256) and wrapped.use_kernel
    bias = jax.random.normal(jax.random.key(1), (384,), jnp.float32).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (1, 5, 256), jnp.float32).astype(jnp.bfloat16)  # leading axes -> M
    for b, out_dtype in ((None, None), (bias, None), (None, jnp.float32)):
        with kernel_context():
            out = linear(wrapped, x, b, out_dtype)
        ref = linear(q, x, b, out_dtype)
        assert out.dtype == ref.dtype and out.shape == (1, 5, 384)
        _close(out, ref, 1e-2 if out.dtype == jnp.bfloat16 else 1e-5)  # f32: summation order only
    assert w8a8_calls == [((5, 256), "float8_e4m3fn" if activations == "fp8" else "int8", (384, 256))] * 3
    # Prefill rows, a K the kernel does not tile, and the "xla" form: XLA's dot on [N, K], the [K, N] rule's sums.
    rows = jax.random.normal(jax.random.key(3), (200, 256), jnp.float32).astype(jnp.bfloat16)
    odd = _w8a8(4, 96, 128, activations)
    no_kernel = PallasW8A8Weight(wrapped.values_t, wrapped.scales, activations, use_kernel=False)
    with kernel_context():
        cases = [(linear(wrapped, rows, bias), linear(q, rows, bias)),
                 (linear(wrap_weight(odd), x[0, :, :96]), linear(odd, x[0, :, :96])),
                 (linear(no_kernel, x, bias, jnp.float32), linear(q, x, bias, jnp.float32))]
    for out, ref in cases:
        _close(out, ref, 1e-5 if out.dtype == jnp.float32 else 1e-2)
    assert len(w8a8_calls) == 3


@pytest.mark.parametrize("architecture,quantization,backend", [("Glm4ForCausalLM", "w8a8-fp8", "auto"),
                                                               ("LlamaForCausalLM", "w8a8-fp8", "pallas")])
def test_model_kernel_equals_xla_rule(tmp_path, w8a8_calls, architecture, quantization, backend):
    save_tiny(architecture, tmp_path, **TINY)
    config, xla_model, _ = load_model(str(tmp_path), jnp.bfloat16, quantization=quantization, matmul_backend="xla")
    assert isinstance(xla_model.layers.qkv.get_value(), ChannelWeight)  # off a GPU "xla" keeps [K, N]
    _, model, _ = load_model(str(tmp_path), jnp.bfloat16, quantization=quantization, matmul_backend="xla")
    with gpu_interpret():  # a GPU target: "auto" wraps only on one
        assert apply_matmul_backend(model, backend) == (5 if backend == "pallas" else 4)  # pallas: + bf16 lm_head
    assert all(isinstance(getattr(model.layers, p).get_value(), PallasW8A8Weight) for p in PROJECTIONS)
    ref, ref_tokens = _greedy_logits(xla_model, config)
    with kernel_context():
        out, tokens = _greedy_logits(model, config)
    assert tokens == ref_tokens
    np.testing.assert_allclose(out, ref, atol=2e-2 * float(np.abs(ref).max()))
    # Decode steps (M = 1) run the kernel for every projection; the 12-token prompt too (M <= 128).
    assert {w for _, _, w in w8a8_calls} == {(256, 128), (128, 128), (512, 128), (128, 256)}
    assert {a for a, _, _ in w8a8_calls} == {(1, 128), (1, 256), (len(PROMPT), 128), (len(PROMPT), 256)}


def test_xla_backend_stores_w8a8_nk_on_gpu_only():
    _, model, _ = load_model("tiny-llama", jnp.float32, quantization="w8a8-fp8", matmul_backend="xla")
    assert isinstance(model.layers.down.get_value(), ChannelWeight)  # CPU: [K, N] is XLA's best layout there
    before = model.layers.down.get_value()
    with gpu_interpret():
        assert apply_matmul_backend(model, "xla") == 4
    after = model.layers.down.get_value()
    assert isinstance(after, PallasW8A8Weight) and not after.use_kernel and after.activations == "fp8"
    np.testing.assert_array_equal(np.asarray(after.values_t, np.float32),
                                  np.swapaxes(np.asarray(before.values, np.float32), -1, -2))
    _, float_model, _ = load_model("tiny-llama", jnp.float32, matmul_backend="xla")
    _, int8_model, _ = load_model("tiny-llama", jnp.float32, quantization="int8", matmul_backend="xla")
    with gpu_interpret():  # nothing else is touched by "xla"
        assert apply_matmul_backend(float_model, "xla") == 0 and apply_matmul_backend(int8_model, "xla") == 0
    assert isinstance(int8_model.layers.down.get_value(), ChannelWeight)
