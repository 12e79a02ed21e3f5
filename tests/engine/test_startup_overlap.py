"""Start-up overlap: on one device the step programs compile from the weights' abstract values while
the weights load (``EngineCore`` -> ``ModelRunner.start_compiling`` / ``bind_weights``). A loader that
blocks until the compile has finished proves the compile needs no weight values; the engine then
generates what an engine that compiled after its weights generates, without compiling again."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.engine import core as core_module
from autoglm_jax.engine.core import param_bytes, serving_model_shapes
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.memory import plan_num_pages
from autoglm_jax.engine.runner import ModelRunner
from autoglm_jax.model.kv_cache import KVCache

# A small ladder: token bucket 16, decode batches 1 and 2 -> 3 step programs.
SETTINGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, dtype="float32", max_batch_size=2,
                max_model_len=64, max_num_batched_tokens=16, decode_steps_per_call=2, max_logprobs=2,
                show_progress=False)
PROMPTS = [{"prompt_token_ids": list(range(5, 19))}, {"prompt_token_ids": list(range(40, 47))}]
PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
WAIT_S = 300  # far above the compile of 3 tiny programs; reached only when the compile waits for the weights


def _generate(llm: LLM):
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return ([o.outputs[0].token_ids for o in outs],
            np.array([[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]))


@pytest.fixture
def runners(monkeypatch) -> list:
    """Every ModelRunner built meanwhile, in order (the loader runs inside ``EngineCore.__init__``)."""
    built = []
    original = ModelRunner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(ModelRunner, "__init__", init)
    return built


def test_programs_compile_before_the_weights_exist(tiny_model_dir, runners, monkeypatch):
    seen = {}

    def slow_load(*args, **kwargs):
        runner = runners[-1]
        assert not runner.has_weights and runner._compiling is not None  # compiling from shapes alone
        runner._compiling.exception(timeout=WAIT_S)  # blocks until the background compile is done
        seen.update(done=runner._compiling.done(), traces=runner.num_traces, programs=len(runner._executables))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(core_module, "load_model", slow_load)
    llm = LLM(model=tiny_model_dir, **SETTINGS)
    runner = llm.engine.runner
    assert seen == dict(done=True, traces=3, programs=3)  # all compiled while the loader still held the weights
    assert runner.num_traces == 3  # the loaded checkpoint matched the abstract model: nothing compiled again
    tokens, logprobs = _generate(llm)
    assert runner.num_traces == 3  # serving traces nothing

    monkeypatch.undo()  # the reference: weights first, each step compiled when first called
    reference = LLM(model=tiny_model_dir, **dict(SETTINGS, warmup=False))
    ref_tokens, ref_logprobs = _generate(reference)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def test_weights_unlike_the_abstract_model_are_compiled_again(caplog):
    config = core_module.model_config_of("tiny-llama")
    abstract = serving_model_shapes(EngineConfig(model="tiny-llama"), config, jnp.float32, "xla", scan_layers=False)
    runner = ModelRunner(abstract, config, max_batch_size=1, max_num_batched_tokens=16, max_sequence_length=64,
                         page_size=16, num_pages=9, cache_dtype=jnp.float32, decode_steps_per_call=2,
                         max_logprobs=2, scan_layers=False)
    assert runner.state.kv.k.shape == (2, 9, 16, 2, 16) and not isinstance(runner.state.kv.k, jax.Array)  # no pool yet
    runner.start_compiling()
    _, bf16_model, _ = load_model("tiny-llama", jnp.bfloat16)  # as a checkpoint in other dtypes would
    with caplog.at_level(logging.WARNING):
        runner.bind_weights(bf16_model)  # stops the background compile
    assert "compiling again" in caplog.text and runner._compiling is None
    traced = runner.num_traces
    runner.warmup()  # compiles for the bf16 weights and runs each program once
    assert runner.num_traces - traced == 2 and len(runner._executables) == 2
    assert {x.dtype for x in jax.tree.leaves(runner.params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="has its weights already"):
        runner.bind_weights(bf16_model)


def test_a_failed_load_stops_the_background_compile(runners, monkeypatch):
    def failing_load(*args, **kwargs):
        raise OSError("checkpoint unreadable")

    monkeypatch.setattr(core_module, "load_model", failing_load)
    with pytest.raises(OSError, match="checkpoint unreadable"):
        LLM(model="tiny-llama", **SETTINGS)
    runner = runners[-1]
    assert runner._compiling is None and not runner.has_weights
    assert len(runner.compile_timings) <= 1  # stopped after the program it was tracing


def test_pool_is_sized_with_the_weights_still_to_come():
    config = core_module.model_config_of("tiny-llama")
    _, model, _ = load_model("tiny-llama", jnp.float32)
    abstract = serving_model_shapes(EngineConfig(model="tiny-llama"), config, jnp.float32, "xla", scan_layers=True)
    real = sum(x.nbytes for x in jax.tree.leaves(model))
    assert param_bytes(abstract) == param_bytes(model) == real > 0
    per_page = KVCache.bytes_per_page(config, 16, jnp.float32)

    class Device:  # a GPU's statistics with 1,000 pages free beyond the reserves
        def memory_stats(self):
            reserves = 64 * config.vocab_size * 5 + 4 * 512 * (config.vocab_size + 2 * config.intermediate_size
                                                               + config.qkv_size + 4 * config.hidden_size) * 2
            return {"bytes_limit": 1000 * per_page + reserves + (256 << 20), "bytes_in_use": 0}

    plan = dict(page_size=16, cache_dtype=jnp.float32, max_batch_size=64, max_sequence_length=256,
                max_num_batched_tokens=512, memory_fraction=1.0, device=Device())
    assert plan_num_pages(config, **plan) == 1000
    assert plan_num_pages(config, **plan, pending_bytes=100 * per_page) == 900
