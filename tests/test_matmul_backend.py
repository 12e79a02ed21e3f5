"""matmul_backend='pallas': the wrapped projections run the Pallas matmul kernels (bf16 weights, and int8 / fp8 /
int4 weight-only ones) where the kernels take the shape, fall back to the XLA rule where they do not, and give the
XLA path's logits and greedy tokens (tiny GLM-4 and Llama checkpoints in bfloat16). On a machine without a
GPU the kernels run in the Mosaic GPU interpreter; a kernel-call recorder checks that they really ran."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.model.decoder import DecoderLayers
from autoglm_jax.model.layers import linear
from autoglm_jax.model.matmul_backend import (PallasChannelWeight, PallasInt4Weight, PallasW8A8Weight, PallasWeight,
                                              apply_matmul_backend, wrap_auto, wrap_weight)
from autoglm_jax.quant.channel import quantize_channel
from autoglm_jax.quant.int4 import Int4Weight, quantize_int4
from pallas_kernels import int4_matmul as i4mm
from pallas_kernels import matmul as bf16_matmul
from pallas_kernels import quantized_matmul as qmm
from pallas_kernels import tuning
from pallas_kernels._interpret import INTERPRETED_DEVICE_KIND, gpu_interpret
from tests.hf_tiny import save_tiny
from tests.model_runner import forward, new_cache

ON_GPU = jax.default_backend() == "gpu"
kernel_context = contextlib.nullcontext if ON_GPU else gpu_interpret
# Every projection in a shape both kernels take (K, N multiples of 128) and its own:
# qkv [128, 256], o [128, 128], gate_up [128, 512], down [256, 128], lm_head [128, 384].
TINY = dict(hidden_size=128, head_dim=32, intermediate_size=256, vocab_size=384, num_hidden_layers=2)
PROMPT = [5, 17, 42, 7, 99, 3, 11, 60, 200, 31, 8, 150]


def record_kernel_calls(monkeypatch) -> list:
    """[(kernel name, a.shape, w.shape)] of every Pallas matmul traced from now to the test's end."""
    calls = []
    for module, name in ((bf16_matmul, "matmul"), (qmm, "quantized_matmul"), (i4mm, "int4_matmul")):
        def record(a, w, *args, _kernel=getattr(module, name), _name=name, **kwargs):
            calls.append((_name, tuple(a.shape), tuple(w.shape)))
            return _kernel(a, w, *args, **kwargs)

        monkeypatch.setattr(module, name, record)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    return record_kernel_calls(monkeypatch)


def _bf16(key, shape, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(jnp.bfloat16)


# ---- the kernels' supports() agree with their wrappers' checks ----------------------------------------


@pytest.mark.parametrize("m,k,n,dtype,out_dtype", [
    (1, 64, 128, jnp.bfloat16, None), (1, 64, 64, jnp.bfloat16, None), (100, 64, 64, jnp.bfloat16, None),
    (200, 64, 128, jnp.bfloat16, None), (200, 64, 64, jnp.bfloat16, None), (1, 48, 128, jnp.bfloat16, None),
    (1, 64, 128, jnp.bfloat16, jnp.float32), (200, 64, 128, jnp.bfloat16, jnp.float32),
    (1, 64, 128, jnp.float32, None)])
def test_matmul_supports_is_what_the_wrapper_accepts(m, k, n, dtype, out_dtype):
    a, w = jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), dtype)
    try:
        with gpu_interpret():
            jax.eval_shape(lambda a, w: bf16_matmul.matmul(a, w, out_dtype=out_dtype), a, w)
        accepted = True
    except ValueError:
        accepted = False
    assert bf16_matmul.supports(m, k, n, dtype, out_dtype) == accepted


@pytest.mark.parametrize("m,k,n,weight_dtype,out_dtype", [
    (1, 128, 128, jnp.int8, None), (1, 128, 128, jnp.float8_e4m3fn, jnp.float32), (1, 64, 128, jnp.int8, None),
    (1, 128, 64, jnp.int8, None), (200, 128, 256, jnp.int8, None), (200, 128, 256, jnp.int8, jnp.float32)])
def test_quantized_supports_is_what_the_wrapper_accepts(m, k, n, weight_dtype, out_dtype):
    a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    w_q, scale = jax.ShapeDtypeStruct((n, k), weight_dtype), jax.ShapeDtypeStruct((n,), jnp.float32)
    try:
        with gpu_interpret():
            jax.eval_shape(lambda a, w, s: qmm.quantized_matmul(a, w, s, out_dtype=out_dtype), a, w_q, scale)
        accepted = True
    except ValueError:
        accepted = False
    assert qmm.supports(m, k, n, jnp.bfloat16, weight_dtype, out_dtype) == accepted


# ---- one weight: kernel where it fits, exactly the XLA rule elsewhere ---------------------------------


def test_kernel_runs_where_it_fits_with_bias_and_float32_output(kernel_calls):
    x, w, bias = _bf16(0, (5, 128)), _bf16(1, (128, 256), 0.05), _bf16(2, (256,))
    for b, out_dtype in ((None, None), (bias, None), (None, jnp.float32)):
        with kernel_context():
            out = linear(PallasWeight(w), x, b, out_dtype)
        ref = linear(w, x, b, out_dtype)
        assert out.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-5)
    assert [c[0] for c in kernel_calls] == ["matmul"] * 3
    rows = _bf16(3, (200, 128))  # prefill size: the large-M kernel, bf16 out only, so with a bias the XLA rule
    with kernel_context():
        out, out_biased = linear(PallasWeight(w), rows), linear(PallasWeight(w), rows, bias)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(linear(w, rows), np.float32), rtol=1e-2, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_biased), np.asarray(linear(w, rows, bias)))
    assert kernel_calls[3:] == [("matmul", (200, 128), (128, 256))]
    q = quantize_channel(w.astype(jnp.float32), "int8")
    with kernel_context():
        out = linear(wrap_weight(q), x.reshape(1, 5, 128), bias)  # leading axes of x are flattened into M
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(linear(q, x.reshape(1, 5, 128), bias), np.float32),
                               rtol=1e-2, atol=1e-5)
    assert kernel_calls[-1] == ("quantized_matmul", (5, 128), (256, 128))


def test_unsupported_shapes_and_dtypes_fall_back_to_the_xla_rule(kernel_calls):
    x, bias = _bf16(0, (3, 64)), _bf16(2, (64,))
    w = _bf16(1, (64, 64), 0.05)                        # N = 64: the decode kernel's tile_n is 128
    q = quantize_channel(_bf16(3, (64, 128)).astype(jnp.float32), "fp8")  # K = 64 < the int8/fp8 tile_k 128
    cases = [(PallasWeight(w), w, x, bias),
             (PallasWeight(w.astype(jnp.float32)), w.astype(jnp.float32), x.astype(jnp.float32), None),
             (wrap_weight(q), q, x, None),
             (PallasWeight(_bf16(4, (2, 64, 128))), _bf16(4, (2, 64, 128)), x, None)]  # stacked: not one layer
    with kernel_context():
        for wrapped, plain, xs, b in cases:
            np.testing.assert_array_equal(np.asarray(linear(wrapped, xs, b)), np.asarray(linear(plain, xs, b)))
    assert kernel_calls == []


def test_int4_kernel_with_in_scales_and_bias_and_its_fallbacks(kernel_calls):
    x, bias = _bf16(0, (5, 256)), _bf16(2, (128,))
    w = jax.random.normal(jax.random.key(1), (256, 128), jnp.float32) * 0.05
    in_scales = jax.random.uniform(jax.random.key(3), (256,), jnp.float32, 0.5, 2.0)
    for group_size in (64, 128):
        q = dataclasses.replace(quantize_int4(w, group_size), in_scales=in_scales)
        wrapped = wrap_weight(q)
        assert isinstance(wrapped, PallasInt4Weight) and wrapped.codes.shape == (256 // group_size, 128, group_size)
        with kernel_context():
            out = linear(wrapped, x, bias)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(linear(q, x, bias), np.float32),
                                   rtol=1e-2, atol=2e-2)
    assert kernel_calls == [("int4_matmul", (5, 256), (4, 128, 64)), ("int4_matmul", (5, 256), (2, 128, 128))]
    # No kernel: 200 rows with a bias (the prefill kernel writes bf16 only), and N = 64 < tile_n: the Int4Weight rule.
    cases = [(q, _bf16(4, (200, 256)), bias), (quantize_int4(w[:, :64], 64), x, None)]
    with kernel_context():
        for plain, xs, b in cases:
            np.testing.assert_array_equal(np.asarray(linear(wrap_weight(plain), xs, b)), np.asarray(linear(plain, xs, b)))
    assert len(kernel_calls) == 2
    for unwrapped in (quantize_int4(w, 32), quantize_int4(w[:96], 64)):  # groups the kernel does not take
        assert wrap_weight(unwrapped) is unwrapped


@pytest.mark.skipif(ON_GPU, reason="checks the choice off GPU")
def test_off_gpu_without_the_interpreter_the_xla_rule_runs(kernel_calls):
    x, w = _bf16(0, (4, 128)), _bf16(1, (128, 128))
    np.testing.assert_array_equal(np.asarray(linear(PallasWeight(w), x)), np.asarray(linear(w, x)))
    assert kernel_calls == []


def test_wrappers_slice_like_their_weights():
    w = _bf16(0, (3, 64, 128))
    one = jax.tree.map(lambda a: a[1], PallasWeight(w))
    assert isinstance(one, PallasWeight) and one.shape == (64, 128)
    q = wrap_weight(quantize_channel(w.astype(jnp.float32), "int8"))
    assert isinstance(q, PallasChannelWeight) and q.shape == (3, 64, 128) and q.values_t.shape == (3, 128, 64)
    layer = jax.tree.map(lambda a: a[2], q)
    assert layer.shape == (64, 128) and layer.scales.shape == (128,)
    assert wrap_weight(quantize_channel(w.astype(jnp.float32), "int8", activations="int8")).activations == "int8"
    q4 = quantize_int4(w.astype(jnp.float32), 64)
    p4 = wrap_weight(q4)
    assert isinstance(p4, PallasInt4Weight) and p4.shape == (3, 64, 128) and p4.codes.shape == (3, 1, 128, 64)
    layer = jax.tree.map(lambda a: a[2], p4)
    assert layer.shape == (64, 128) and layer.scales.shape == (1, 128)
    back = layer.as_int4_weight()  # exactly the Int4Weight it came from
    assert isinstance(back, Int4Weight) and back.group_size == 64
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(jax.tree.map(lambda a: a[2], q4))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---- the model and the engine -----------------------------------------------------------------------


@nnx.jit
def _jitted_forward(model, token_ids, kv_cache, metadata):
    return model(token_ids, kv_cache, metadata)


def _greedy_logits(model, config, steps: int = 2):
    """Logits of PROMPT's last position, then of ``steps`` greedy decode steps: ([steps + 1, V], tokens).
    Each step is one jitted call, as in the engine: dispatching the interpreted kernels op by op (eager,
    unrolled layers) can deadlock the CPU client."""
    model = functools.partial(_jitted_forward, model)
    cache, table = new_cache(config, len(PROMPT) + steps + 1, jnp.bfloat16)
    logits, cache = forward(model, PROMPT, 0, cache, table)
    rows, tokens = [logits[-1]], []
    for step in range(steps):
        tokens.append(int(rows[-1].argmax()))
        logits, cache = forward(model, [tokens[-1]], len(PROMPT) + step, cache, table)
        rows.append(logits[-1])
    return np.stack(rows), tokens


@pytest.mark.parametrize("architecture,quantization", [("Glm4ForCausalLM", None), ("LlamaForCausalLM", "fp8"),
                                                       ("Glm4ForCausalLM", "int4-g64"), ("LlamaForCausalLM", "int4")])
def test_model_pallas_equals_xla(tmp_path, kernel_calls, architecture, quantization):
    save_tiny(architecture, tmp_path, **TINY)
    config, xla_model, _ = load_model(str(tmp_path), jnp.bfloat16, quantization=quantization)
    _, pallas_model, _ = load_model(str(tmp_path), jnp.bfloat16, quantization=quantization, matmul_backend="pallas")
    ref, ref_tokens = _greedy_logits(xla_model, config)
    with kernel_context():
        out, tokens = _greedy_logits(pallas_model, config)
    assert tokens == ref_tokens
    np.testing.assert_allclose(out, ref, atol=2e-2 * float(np.abs(ref).max()))
    kernels = {name for name, _, _ in kernel_calls}
    quantized_kernel = "int4_matmul" if quantization and quantization.startswith("int4") else "quantized_matmul"
    assert kernels == ({"matmul"} if quantization is None else {"matmul", quantized_kernel})  # lm_head: bf16
    weights = {w for _, _, w in kernel_calls}
    assert len(weights) == 5, weights  # qkv, o, gate_up, down, lm_head


@pytest.mark.skipif(not hasattr(DecoderLayers, "unstack"), reason="per-layer weights not in this tree yet")
def test_unstacked_pallas_model_equals_xla(tmp_path, kernel_calls):
    save_tiny("Glm4ForCausalLM", tmp_path, **TINY)
    config, xla_model, _ = load_model(str(tmp_path), jnp.bfloat16, quantization="int8")
    _, pallas_model, _ = load_model(str(tmp_path), jnp.bfloat16, quantization="int8", matmul_backend="pallas")
    xla_model.layers.unstack()
    pallas_model.layers.unstack()  # splits every leaf of the wrappers into per-layer buffers
    assert isinstance(pallas_model.layers.qkv.get_value()[1], PallasChannelWeight)
    ref, ref_tokens = _greedy_logits(xla_model, config, steps=1)
    with kernel_context():
        out, tokens = _greedy_logits(pallas_model, config, steps=1)
    assert tokens == ref_tokens
    np.testing.assert_allclose(out, ref, atol=2e-2 * float(np.abs(ref).max()))
    assert {w for _, _, w in kernel_calls} == {(256, 128), (128, 128), (512, 128), (128, 256), (128, 384)}


@pytest.mark.parametrize("backend", ["pallas", "auto"])
def test_engine_greedy_equals_xla(tmp_path, kernel_calls, measured_table, backend):
    """Through the engine (abstract shapes, compiled decode and mixed programs) the greedy tokens are XLA's.
    "pallas": the kernels run. "auto" (the default), with ``measured_table``: only qkv [128, 256] has a measured
    win (at M <= 8), so only its kernel runs, in decode programs of <= 8 rows."""
    from autoglm_jax import LLM, SamplingParams

    save_tiny("Glm4ForCausalLM", tmp_path, **TINY)
    settings = dict(dtype="bfloat16", max_model_len=64, max_batch_size=2, max_num_batched_tokens=32,
                    decode_steps_per_call=4, compilation_cache_dir=None, show_progress=False, warmup=False)
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": list(range(20, 45))}]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def greedy(matmul_backend):
        llm = LLM(str(tmp_path), matmul_backend=matmul_backend, **settings)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    ref = greedy("xla")
    assert kernel_calls == []
    with kernel_context():
        assert greedy(backend) == ref
    assert kernel_calls
    if backend == "auto":
        assert all(name == "matmul" and a[0] <= 8 and w == (128, 256) for name, a, w in kernel_calls)


# ---- settings ---------------------------------------------------------------------------------------


def test_matmul_backend_setting_is_validated():
    assert EngineConfig(matmul_backend="pallas").matmul_backend == "pallas"
    assert EngineConfig().matmul_backend == "auto"
    with pytest.raises(ValueError, match="matmul_backend='cublas'; choose auto, xla or pallas"):
        EngineConfig(matmul_backend="cublas")
    with pytest.raises(ValueError, match="matmul_backend='triton'"):
        load_model("tiny-llama", jnp.float32, matmul_backend="triton")
    with pytest.raises(ValueError, match="tensor parallelism"):
        load_model("tiny-llama", jnp.float32, matmul_backend="pallas", mesh=object())
    _, model, _ = load_model("tiny-llama", jnp.float32)
    assert apply_matmul_backend(model, "xla") == 0 and apply_matmul_backend(model, "pallas") == 4  # tied head
    assert isinstance(model.layers.down.get_value(), PallasWeight)


def test_auto_wraps_only_quantized_weights_and_only_on_gpu():
    _, float_model, _ = load_model("tiny-llama", jnp.float32)
    _, int8_model, _ = load_model("tiny-llama", jnp.float32, quantization="int8")  # the default: "auto", on CPU
    assert not isinstance(int8_model.layers.down.get_value(), PallasChannelWeight)
    with gpu_interpret():  # a GPU target
        assert apply_matmul_backend(float_model, "auto") == 0  # bf16 / f32 weights: XLA's GEMV is as fast
        assert apply_matmul_backend(int8_model, "auto") == 4
    assert isinstance(float_model.layers.down.get_value(), jax.Array)
    assert isinstance(int8_model.layers.down.get_value(), PallasChannelWeight)
    _, int4_model, _ = load_model("tiny-llama", jnp.float32, quantization="int4-g64")
    with gpu_interpret():
        assert apply_matmul_backend(int4_model, "auto") == 4
    assert isinstance(int4_model.layers.down.get_value(), PallasInt4Weight)
    _, w8a8_model, _ = load_model("tiny-llama", jnp.float32, quantization="w8a8-int8")
    with gpu_interpret():
        assert apply_matmul_backend(w8a8_model, "auto") == 4  # W8A8: the 8-bit x 8-bit kernel's [N, K] wrapper
    assert isinstance(w8a8_model.layers.down.get_value(), PallasW8A8Weight)
    _, mesh_model, _ = load_model("tiny-llama", jnp.float32, quantization=None, matmul_backend="auto", mesh=None)
    assert isinstance(mesh_model.layers.down.get_value(), jax.Array)


@pytest.fixture
def measured_table(tmp_path, monkeypatch):
    """A bf16 matmul tuning table for the card the tests target: the kernel measured faster than XLA at M <= 8 for
    [128, 256] and [64, 256] (tiny-llama's gate_up) weights, slower at M = 16, and untimed for [128, 128]."""
    kind = jax.devices()[0].device_kind if ON_GPU else INTERPRETED_DEVICE_KIND  # the card kernel_context targets

    def entry(m, k, n, kernel_us, xla_us=10.0):
        times = {} if kernel_us is None else {"kernel_us": kernel_us, "xla_us": xla_us}
        return {"device_kind": kind, "dtype": "bfloat16", "shape": bf16_matmul.shape_key(m, k, n),
                "config": bf16_matmul.small_m_heuristic(m, k, n, 2), **times}

    tables = tmp_path / "tuning"  # apart from any checkpoint the test writes to tmp_path
    tables.mkdir()
    (tables / "matmul.json").write_text(json.dumps({"entries": [
        entry(8, 128, 256, 8.0), entry(16, 128, 256, 12.0), entry(8, 64, 256, 8.0), entry(8, 128, 128, None)]}))
    monkeypatch.setattr(tuning, "TUNING_DIR", tables)
    tuning._load_table.cache_clear()
    yield
    tuning._load_table.cache_clear()


def test_auto_runs_a_bf16_kernel_only_where_the_table_measured_it_faster(measured_table, kernel_calls):
    w = _bf16(1, (128, 256), 0.05)
    with kernel_context():
        wrapped = wrap_auto(w)
        assert isinstance(wrapped, PallasWeight) and wrapped.where_faster
        assert isinstance(wrap_auto(_bf16(2, (128, 128))), jax.Array)  # only untimed entries: stays an array
        for m in (5, 16):  # M8 measured faster: the kernel; M16 measured slower: exactly XLA's dot
            x = _bf16(m, (m, 128))
            out, ref = linear(wrapped, x), linear(w, x)
            np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert kernel_calls == [("matmul", (5, 128), (128, 256))]
    _, model, _ = load_model("tiny-llama", jnp.bfloat16)
    with kernel_context():
        assert apply_matmul_backend(model, "auto") == 1  # gate_up [2, 64, 256]; qkv, o, down stay arrays
    assert isinstance(model.layers.gate_up.get_value(), PallasWeight) and model.layers.gate_up.get_value().where_faster
    assert isinstance(model.layers.qkv.get_value(), jax.Array)


def test_serve_flag_reaches_the_engine():
    from tests.server.test_serve_config import _settings

    assert _settings("--matmul_backend=pallas")["matmul_backend"] == "pallas"
    assert _settings()["matmul_backend"] == "auto"
