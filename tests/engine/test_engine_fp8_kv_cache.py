"""``kv_cache_dtype="fp8"`` through the engine on tiny GLM-4 and Llama: the pool is float8 e4m3fn, sized
from the same memory budget into as many more pages as its pages are smaller, greedy generation runs
end to end with finite logprobs, and the compiled programs' fingerprint tells the two caches apart.
CPU reports no device memory, so the plan gets a GPU-like device limit (``memory.device_memory_stats``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.config import PRESETS
from autoglm_jax.engine import memory
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import param_bytes, serving_model_shapes
from autoglm_jax.engine.device_state import DeviceState
from autoglm_jax.engine.executable_cache import abstract_arguments, fingerprint
from autoglm_jax.model.kv_cache import KVCache

SETTINGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, dtype="float32", max_batch_size=2,
                max_model_len=64, max_num_batched_tokens=16, decode_steps_per_call=2, max_logprobs=1,
                show_progress=False, memory_fraction=1.0, warmup=False)
PAGE_SIZE = EngineConfig().page_size
FLOAT_PAGES = 40.5  # the budget beyond weights and slot state, in float32 ("auto" on CPU) pages


def _plan_for_budget(monkeypatch, preset: str) -> int:
    """Gives the plan a device of weights + slot state + FLOAT_PAGES float32 pages (no activation reserve);
    returns those budget bytes."""
    config = PRESETS[preset]
    abstract = serving_model_shapes(EngineConfig(model=preset), config, jnp.float32, "xla", scan_layers=True)
    taken = param_bytes(abstract) + DeviceState.slot_state_bytes(config, SETTINGS["max_batch_size"])
    budget = int(FLOAT_PAGES * KVCache.bytes_per_page(config, PAGE_SIZE, jnp.float32))
    stats = {"bytes_limit": taken + budget, "bytes_in_use": 0}
    monkeypatch.setattr(memory, "device_memory_stats", lambda device: stats)
    monkeypatch.setattr(memory, "activation_reserve_bytes", lambda config, tokens: 0)
    return budget


@pytest.mark.parametrize("preset", ["tiny-glm4", "tiny-llama"])
def test_fp8_pool_has_more_pages_and_generates(monkeypatch, preset):
    budget = _plan_for_budget(monkeypatch, preset)
    config = PRESETS[preset]
    auto = LLM(model=preset, **SETTINGS).engine.runner
    fp8 = LLM(model=preset, kv_cache_dtype="fp8", **SETTINGS)
    runner = fp8.engine.runner
    assert auto.state.kv.k.dtype == jnp.float32
    assert runner.state.kv.k.dtype == runner.state.kv.v.dtype == jnp.float8_e4m3fn
    float_page, fp8_page = (KVCache.bytes_per_page(config, PAGE_SIZE, d) for d in (jnp.float32, jnp.float8_e4m3fn))
    assert auto.num_pages == budget // float_page
    assert runner.num_pages == runner.state.kv.k.shape[1] == fp8.engine.allocator.num_pages == budget // fp8_page
    ratio = float_page / fp8_page  # 4: float32 (CPU's "auto") to 1-byte pages
    assert runner.num_pages / auto.num_pages == pytest.approx(ratio, rel=1 / auto.num_pages)

    prompts = [{"prompt_token_ids": list(range(5, 23))}, {"prompt_token_ids": list(range(100, 109))}]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    for output in fp8.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        assert len(completion.token_ids) == 8
        chosen = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        assert np.isfinite(chosen).all() and np.isfinite(completion.cumulative_logprob), chosen
    k = np.asarray(runner.state.kv.k.astype(jnp.float32))
    assert not np.isnan(k).any() and np.abs(k).max() > 0  # the prompts' keys were written


def test_program_fingerprint_differs_between_float_and_fp8_caches():
    """The executable cache keys a program on its arguments' abstract values, the KV pool among them
    (``ModelRunner.compile_programs``): an fp8 pool's programs are never loaded for a float one."""
    config = PRESETS["tiny-llama"]

    def key(dtype):
        state = abstract_arguments(jax.eval_shape(lambda: DeviceState.create(config, 9, PAGE_SIZE, 2, dtype)))
        return fingerprint("decode", "graph", (state,), {"max_steps": 2})

    assert key(jnp.float32) == key(jnp.float32)
    assert key(jnp.float8_e4m3fn) != key(jnp.float32)
    assert key(jnp.float8_e4m3fn) != key(jnp.bfloat16)
