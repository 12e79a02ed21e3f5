"""The KV pool plan checked against the compiled step programs (``memory.fit_programs`` at start-up):
a pool that leaves the largest program less than it needs (``temp + output - alias``) is re-planned
smaller before it is allocated, and the ladder compiled again for it. CPU reports no device memory, so
these tests give the plan a GPU-like device limit (``memory.device_memory_stats``) sized around the
tiny model's weights and slot state."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import pytest

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.config import PRESETS
from autoglm_jax.engine import memory
from autoglm_jax.engine.core import param_bytes, serving_model_shapes
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.device_state import DeviceState
from autoglm_jax.model.kv_cache import KVCache

# A small ladder: token bucket 16, decode batch 1 -> 2 step programs (a few hundred KB each).
SETTINGS = dict(model="tiny-llama", skip_tokenizer_init=True, compilation_cache_dir=None, dtype="float32",
                max_batch_size=1, max_model_len=64, max_num_batched_tokens=16, decode_steps_per_call=2,
                max_logprobs=2, show_progress=False, memory_fraction=1.0, page_size=16)
NUM_PROGRAMS = 2
CONFIG = PRESETS["tiny-llama"]
PAGE_BYTES = KVCache.bytes_per_page(CONFIG, SETTINGS["page_size"], jnp.float32)
PAGES_PER_SEQUENCE = SETTINGS["max_model_len"] // SETTINGS["page_size"]
PROMPTS = [{"prompt_token_ids": list(range(5, 19))}, {"prompt_token_ids": list(range(40, 47))}]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _taken_bytes() -> int:
    """What the plan counts before the pool: the weights (still to load) and the slot state."""
    abstract = serving_model_shapes(EngineConfig(model="tiny-llama"), CONFIG, jnp.float32, "xla", scan_layers=True)
    return param_bytes(abstract) + DeviceState.slot_state_bytes(CONFIG, SETTINGS["max_batch_size"])


@pytest.fixture
def device_limit(monkeypatch):
    """Sets the device's bytes_limit the plan reads (bytes_in_use 0) to taken + ``extra`` bytes."""
    def set_limit(extra: int) -> None:
        stats = {"bytes_limit": _taken_bytes() + extra, "bytes_in_use": 0}
        monkeypatch.setattr(memory, "device_memory_stats", lambda device: stats)
    return set_limit


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_programs_that_do_not_fit_shrink_the_pool(device_limit, monkeypatch, caplog):
    # The formula reserves nothing: the pool takes all but the rounding, the programs need more.
    monkeypatch.setattr(memory, "activation_reserve_bytes", lambda config, tokens: 0)
    device_limit(memory.PROGRAM_MARGIN_BYTES + 400 * PAGE_BYTES)
    with caplog.at_level(logging.WARNING, logger="autoglm_jax.engine.memory"):
        llm = LLM(**SETTINGS)
    runner = llm.engine.runner
    planned = (memory.PROGRAM_MARGIN_BYTES + 400 * PAGE_BYTES) // PAGE_BYTES
    assert "num_pages %d -> %d" % (planned, runner.num_pages) in caplog.text and runner.num_pages < 400
    # the programs compiled for the re-planned pool fit the room it leaves, with the margin to spare
    room = memory.PROGRAM_MARGIN_BYTES + (400 - runner.num_pages) * PAGE_BYTES
    assert 0 < max(runner.program_needs().values()) <= room - memory.PROGRAM_MARGIN_BYTES
    assert llm.engine.allocator.num_pages == runner.num_pages == runner.state.kv.k.shape[1]
    assert runner.num_traces == 2 * NUM_PROGRAMS  # compiled for the planned pool, then for the re-planned one
    tokens = _tokens(llm)
    assert runner.num_traces == 2 * NUM_PROGRAMS  # serving traces nothing

    monkeypatch.undo()  # the reference: no device limit, its own pool size, each step compiled when first called
    reference = LLM(**dict(SETTINGS, warmup=False, num_pages=64))
    assert tokens == _tokens(reference)


def test_programs_that_fit_keep_the_plan(device_limit, caplog):
    device_limit(memory.activation_reserve_bytes(CONFIG, 16) + 100 * PAGE_BYTES)
    with caplog.at_level(logging.WARNING, logger="autoglm_jax.engine.memory"):
        llm = LLM(**SETTINGS)
    runner = llm.engine.runner
    assert runner.num_pages == 100 and runner.num_traces == NUM_PROGRAMS  # compiled once
    assert len(runner.program_needs()) == NUM_PROGRAMS and caplog.text == ""


def test_a_user_pool_that_does_not_fit_is_only_warned_about(device_limit, caplog):
    device_limit(100 * PAGE_BYTES)
    with caplog.at_level(logging.WARNING, logger="autoglm_jax.engine.memory"):
        llm = LLM(**dict(SETTINGS, num_pages=100))
    assert "lower num_pages" in caplog.text
    assert llm.engine.runner.num_pages == 100 and llm.engine.runner.num_traces == NUM_PROGRAMS


def test_a_replan_that_cannot_hold_one_sequence_raises(device_limit, monkeypatch):
    monkeypatch.setattr(memory, "activation_reserve_bytes", lambda config, tokens: 0)
    device_limit(memory.PROGRAM_MARGIN_BYTES + PAGES_PER_SEQUENCE * PAGE_BYTES)  # the plan: 1 sequence + margin
    with pytest.raises(ValueError, match="max_num_batched_tokens or max_batch_size"):
        LLM(**SETTINGS)


def test_fit_programs_arithmetic(monkeypatch):
    monkeypatch.setattr(memory, "PROGRAM_MARGIN_BYTES", 1_000)
    plan = memory.PoolPlan(num_pages=0, page_bytes=1_000, pages_per_sequence=4, bytes_limit=100_000,
                           taken_bytes=10_000, memory_fraction=0.8).with_reserve(5_000)
    assert plan.num_pages == 65 and plan.program_room_bytes == 25_000  # 0.2 x bytes_limit + reserve
    assert memory.fit_programs(plan, {"mixed 16": 25_000}) is plan
    no_stats = memory.PoolPlan(num_pages=9, page_bytes=1_000, pages_per_sequence=4)
    assert memory.fit_programs(no_stats, {"mixed 16": 10**12}) is no_stats
    replanned = memory.fit_programs(plan, {"decode 2": 1, "mixed 16": 30_000})
    assert (replanned.num_pages, replanned.reserve_bytes, replanned.program_room_bytes) == (59, 11_000, 31_000)
    with pytest.raises(ValueError, match="mixed 16 needs"):
        memory.fit_programs(plan, {"mixed 16": 95_000})
