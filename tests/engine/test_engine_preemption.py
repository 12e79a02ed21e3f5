"""Preemption by recompute, end to end on a tiny KV pool (12 pages of 8 tokens; one sequence may
use 8): preempted requests finish with exactly their solo greedy output, and random
submit/abort/step sequences (hypothesis) never leak or double-free a page."""

from __future__ import annotations

import collections

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from autoglm_jax.llm import LLM
from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import random_prompt

POOL_ARGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, max_batch_size=4, max_model_len=64,
                 max_num_batched_tokens=32, decode_steps_per_call=4, page_size=8, num_pages=12, max_logprobs=0)
PROMPT_LENGTHS = (20, 27, 12, 31, 5)
MAX_TOKENS = (30, 25, 40, 20, 45)


@pytest.fixture(scope="module")
def pool_llm(tiny_model_dir):
    return LLM(model=tiny_model_dir, **POOL_ARGS)


@pytest.fixture(scope="module")
def workload():
    rng = np.random.default_rng(11)
    prompts = [random_prompt(rng, n) for n in PROMPT_LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return prompts, params


@pytest.fixture(scope="module")
def solo_outputs(pool_llm, workload):
    prompts, params = workload
    return [pool_llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]


def check_pages(core) -> None:
    """Every allocated page belongs to exactly one running request; free + owned = usable."""
    allocator, owned = core.allocator, collections.Counter()
    for request in core.scheduler.running:
        owned.update(request.pages)
    assert all(count == 1 for count in owned.values()), f"pages owned twice: {[p for p, c in owned.items() if c > 1]}"
    assert all(allocator.refcount(page) == 1 for page in owned)
    assert allocator.num_used == len(owned), f"{allocator.num_used} pages allocated, {len(owned)} owned by running requests"
    assert not core.scheduler.waiting or all(not r.pages for r in core.scheduler.waiting)


def test_preempted_requests_recompute_exactly(pool_llm, workload, solo_outputs):
    core = pool_llm.engine
    prompts, params = workload
    preemptions_before = core.metrics.num_preemptions
    outs = pool_llm.generate(prompts, params, use_tqdm=False)
    preempted = core.metrics.num_preemptions - preemptions_before
    assert preempted > 0, "the workload must run the 11-page pool out"
    assert any(o.metrics.num_preemptions > 0 for o in outs)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == solo_outputs[i], f"request {i} (preempted {out.metrics.num_preemptions}x)"
        assert out.outputs[0].finish_reason == "length"
    check_pages(core)
    assert core.allocator.num_free == core.allocator.num_usable_pages


operations = st.lists(
    st.one_of(st.tuples(st.just("submit"), st.integers(0, len(PROMPT_LENGTHS) - 1)),
              st.tuples(st.just("abort"), st.integers(0, 7)),
              st.tuples(st.just("step"), st.integers(1, 4))),
    min_size=4, max_size=20)


@hypothesis.settings(max_examples=12, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(ops=operations)
def test_random_submit_abort_step_keeps_pages_consistent(pool_llm, workload, solo_outputs, ops):
    core = pool_llm.engine
    prompts, params = workload
    submitted: list[tuple[str, int]] = []  # (request id, workload index)
    final, aborted = {}, set()

    def step():
        for out in core.step():
            if out.finished:
                final[out.request_id] = out
        check_pages(core)

    for kind, value in ops:
        if kind == "submit":
            submitted.append((core.add_request(prompts[value], params[value]).request_id, value))
        elif kind == "abort" and value < len(submitted):
            request_id = submitted[value][0]
            if core.abort(request_id):
                aborted.add(request_id)
            check_pages(core)
        elif kind == "step":
            for _ in range(value):
                step()
    for _ in range(400):
        if not core.has_unfinished_requests():
            break
        step()
    assert not core.has_unfinished_requests()
    assert core.allocator.num_free == core.allocator.num_usable_pages, "pages leaked"
    assert core.scheduler.num_running == core.scheduler.num_waiting == 0
    for request_id, index in submitted:
        if request_id in aborted:
            continue
        out = final[request_id]
        assert out.outputs[0].token_ids == solo_outputs[index], f"{request_id} (workload {index}) differs from solo"
