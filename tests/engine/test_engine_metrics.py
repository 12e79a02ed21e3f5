"""Metrics after a real workload: per request on ``RequestOutput.metrics`` (queue time, TTFT, TPOT,
end-to-end) and per engine (``EngineMetrics.snapshot``: tokens/s, running/waiting, KV utilization,
preemptions)."""

from __future__ import annotations

import time

import numpy as np

from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import random_prompt


def test_request_and_engine_metrics_after_a_workload(tiny_llm):
    core = tiny_llm.engine
    before = core.metrics.snapshot(time.monotonic())
    rng = np.random.default_rng(51)
    prompts = [random_prompt(rng, n) for n in (4, 50, 9, 20, 33, 7)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (10, 4, 1, 16, 6, 12)]
    params.append(SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=5, ignore_eos=True))
    prompts.append(prompts[0])

    utilization_seen = []
    request_ids = [core.add_request(p, sp).request_id for p, sp in zip(prompts, params)]
    final = {}
    while core.has_unfinished_requests():
        final.update({o.request_id: o for o in core.step() if o.finished})
        utilization_seen.append(core.metrics.kv_cache_utilization)
    after = core.metrics.snapshot(time.monotonic())

    for request_id, sp in zip(request_ids, params):
        m = final[request_id].metrics
        assert m is not None and m.request_id == request_id
        assert m.num_output_tokens == sp.n * sp.max_tokens == sum(len(c.token_ids) for c in final[request_id].outputs)
        assert 0 <= m.queue_time_s <= m.ttft_s <= m.e2e_latency_s
        assert (m.tpot_s is None) == (sp.max_tokens == 1) and (m.tpot_s is None or m.tpot_s > 0)
        assert m.finish_reason == "length" and m.num_preemptions == 0
    waited = final[request_ids[-1]].metrics  # queued behind a full batch of 4
    assert waited.queue_time_s > 0

    generated = sum(sp.n * sp.max_tokens for sp in params)
    assert after["num_requests"] - before["num_requests"] == len(params)
    assert after["num_finished"] - before["num_finished"] == len(params) + 1  # n=2: two sequences
    assert after["total_generated_tokens"] - before["total_generated_tokens"] == generated
    assert after["total_prompt_tokens"] - before["total_prompt_tokens"] >= sum(len(p["prompt_token_ids"]) for p in prompts)
    assert after["generation_tokens_per_s"] > 0 and after["prompt_tokens_per_s"] > 0
    assert after["num_running"] == after["num_waiting"] == 0 and after["kv_cache_utilization"] == 0.0
    assert 0 < max(utilization_seen) <= 1
    for name in ("queue_time_s", "ttft_s", "tpot_s", "e2e_latency_s"):
        assert after[name]["p50"] <= after[name]["max"]


def test_abort_and_preemption_are_counted(tiny_llm):
    core = tiny_llm.engine
    before = core.metrics.snapshot(time.monotonic())
    request_id = core.add_request(random_prompt(np.random.default_rng(52), 5),
                                  SamplingParams(temperature=0, max_tokens=50)).request_id
    core.step()
    assert core.metrics.num_running == 1
    state = core.requests[request_id]
    assert core.abort(request_id)
    out = state.output()
    assert out.outputs[0].finish_reason == "abort" and out.metrics.finish_reason == "abort"
    after = core.metrics.snapshot(time.monotonic())
    assert after["num_aborted"] - before["num_aborted"] == 1
    assert after["num_preemptions"] == core.scheduler.num_preemptions
