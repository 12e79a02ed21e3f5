"""Step programs' temporary memory with W8A8 weights: the XLA 8-bit rule (``quant.channel.w8a8_product``,
decode batches above ``matmul.SMALL_M_MAX`` and mixed steps) must not leave a weight-sized copy of every
layer live through the program. XLA:CPU upcasts the fp8 weight to float32 for the dot; without the rule's
optimization barrier those upcasts only depend on the program's parameters, so XLA hoists them out of the
decode ``while`` loop (and schedules them ahead of the layers in the mixed step): +4 bytes of temp per weight
element and layer (GLM-4-9B: +0.76 GiB a layer, ~30 GiB at 40 layers), which the KV pool's sizing
(``engine.memory``) does not reserve. Compiled from abstract shapes on CPU, weights stored [N, K] as on a GPU
(``gpu_interpret`` makes ``matmul_backend`` wrap them), layers unrolled as on a GPU."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from autoglm_jax.config import PRESETS
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import param_bytes, serving_model_shapes
from autoglm_jax.engine.executable_cache import abstract_arguments
from autoglm_jax.engine.memory import plan_num_pages
from autoglm_jax.engine.runner import ModelRunner
from autoglm_jax.model.attention import resolve_attention_backend
from autoglm_jax.model.matmul_backend import PallasW8A8Weight
from pallas_kernels._interpret import gpu_interpret
from pallas_kernels.matmul import SMALL_M_MAX

# Weights large next to the activations, so one layer's float32 weight copy stands out of the temp.
CONFIG = dataclasses.replace(PRESETS["tiny-glm4"], hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=64)
ROWS = 2 * SMALL_M_MAX  # decode batch above the W8A8 kernel's sizes: XLA's 8-bit dot, inside the decode loop


def _layer_weight_elements(config) -> int:
    h, i = config.hidden_size, config.intermediate_size
    return h * config.qkv_size + config.num_attention_heads * config.head_dim * h + h * 2 * i + i * h


def _memory(config, quantization: str | None, kind: str, rows: int, tokens: int, num_pages: int,
            max_sequence_length: int = 64):
    """memory_analysis() of the engine's decode (``rows``, 2 steps) or mixed (``tokens``) program, compiled
    from abstract weights as at start-up; off a GPU inside ``gpu_interpret`` (the GPU's weight layout)."""
    engine = EngineConfig(model="glm-4-9b-0414", quantization=quantization)
    on_gpu = jax.default_backend() == "gpu"
    attention = resolve_attention_backend("auto", config, jnp.bfloat16, 16)
    with contextlib.nullcontext() if on_gpu else gpu_interpret():
        model = serving_model_shapes(engine, config, jnp.bfloat16, attention, scan_layers=False)
        runner = ModelRunner(model, config, max_batch_size=rows, max_num_batched_tokens=tokens,
                             max_sequence_length=max_sequence_length, page_size=16, num_pages=num_pages,
                             cache_dtype=jnp.bfloat16, decode_steps_per_call=2, max_logprobs=0, scan_layers=False)
        params, state = abstract_arguments(runner.params), abstract_arguments(runner.state)
        if quantization is not None:
            assert isinstance(runner.params["layers"]["gate_up"].get_value()[0], PallasW8A8Weight)  # [N, K]
        inp = runner._empty_decode_input(rows) if kind == "decode" else runner._empty_step_input(tokens)
        lowered = runner.lower_step(kind, inp, params, state)  # max_steps 2, no logprobs: the runner's settings
    return lowered.compile().memory_analysis()


def _temp_bytes(quantization: str | None, num_layers: int, kind: str) -> int:
    config = dataclasses.replace(CONFIG, num_hidden_layers=num_layers)
    return _memory(config, quantization, kind, ROWS, ROWS, num_pages=64).temp_size_in_bytes


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_w8a8_programs_hold_no_weight_copy_per_layer(kind):
    one_layer_f32 = 4 * _layer_weight_elements(CONFIG)
    w8a8 = {layers: _temp_bytes("w8a8-fp8", layers, kind) for layers in (1, 3)}
    bf16 = _temp_bytes(None, 3, kind)
    # per layer: no float32 weight copy kept (was +one_layer_f32 a layer)
    assert w8a8[3] - w8a8[1] < one_layer_f32 / 2, (w8a8, one_layer_f32)
    assert w8a8[3] <= bf16 + one_layer_f32, (w8a8, bf16, one_layer_f32)  # at most one layer's copy over bf16


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_glm4_9b_w8a8_programs_fit_beside_the_pool(kind):
    """GLM-4-9B-0414 at the serving benchmark's settings (decode 256 rows, mixed 2048 tokens, the KV pool the
    engine plans for w8a8-fp8): compiled only, no weights. Run with -s for the numbers."""
    config = PRESETS["glm-4-9b-0414"]
    engine = EngineConfig(model="glm-4-9b-0414", quantization="w8a8-fp8")
    pending = param_bytes(serving_model_shapes(engine, config, jnp.bfloat16, "xla", scan_layers=False))
    pages = plan_num_pages(config, page_size=16, cache_dtype=jnp.bfloat16, max_batch_size=256,
                           max_sequence_length=2048, max_num_batched_tokens=2048, memory_fraction=0.85,
                           pending_bytes=pending)
    results = {q: _memory(config, q, kind, 256, 2048, pages, 2048) for q in (None, "w8a8-fp8")}
    for q, m in results.items():
        print(f"{kind} {q or 'bf16'} pages={pages}: temp {m.temp_size_in_bytes / 2**30:.2f} GiB, output "
              f"{m.output_size_in_bytes / 2**30:.2f}, aliased {m.alias_size_in_bytes / 2**30:.2f}")
    bf16, w8a8 = results[None], results["w8a8-fp8"]
    assert w8a8.output_size_in_bytes - w8a8.alias_size_in_bytes < 1 << 30  # the KV pool is updated in place
    assert w8a8.temp_size_in_bytes <= bf16.temp_size_in_bytes + (1 << 30)  # no weight-sized temporaries
