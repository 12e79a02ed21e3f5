"""``AutoGLMEngine`` with the issue's acceptance settings on the default model: concurrent requests
from several threads, ``stream`` / ``stream_async``, ``abort`` mid-stream, ``stop(drain=False)``;
and static batching (``use_dynamic_batching=False``) on the tiny model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import numpy as np
import pytest

from autoglm_jax.engine.async_engine import AutoGLMEngine
from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import TINY_ENGINE_ARGS, jit_cache_sizes, num_ladder_buckets, random_prompt

PROMPTS = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4,", "def fibonacci(n):",
           "Once upon a time", "The best way to learn JAX is", "Translate to French: good morning",
           "List three colors:"]


def wait_until_idle(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.core.has_unfinished_requests() or engine.core.scheduler.has_unfinished:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def test_concurrent_requests_from_several_threads(default_engine):
    params = [SamplingParams(temperature=0, max_tokens=6 + 2 * (i % 4)) for i in range(len(PROMPTS))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        futures = [pool.submit(default_engine.generate, p, sp, 120) for p, sp in zip(PROMPTS, params)]
        together = [f.result() for f in futures]
    alone = [default_engine.generate(p, sp, 120) for p, sp in zip(PROMPTS[:3], params[:3])]
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in together[:3]]
    for out, sp in zip(together, params):
        assert out.finished and len(out.outputs[0].token_ids) <= sp.max_tokens and out.outputs[0].text
    runner = default_engine.core.runner
    assert runner.num_traces == num_ladder_buckets(runner), "serving recompiled"
    metrics = default_engine.metrics()
    assert metrics["num_finished"] >= len(PROMPTS) + 3 and metrics["generation_tokens_per_s"] > 0


def test_stream_is_incremental_and_ends_with_the_generate_result(default_engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    partials = list(default_engine.stream(PROMPTS[0], params))
    final = default_engine.generate(PROMPTS[0], params)
    assert len(partials) > 2, "decoding several steps per call still streams more than once"
    for before, after in zip(partials, partials[1:]):
        assert after.outputs[0].text.startswith(before.outputs[0].text)
        assert after.outputs[0].token_ids[: len(before.outputs[0].token_ids)] == before.outputs[0].token_ids
    assert [p.finished for p in partials] == [False] * (len(partials) - 1) + [True]
    assert partials[-1].outputs[0].token_ids == final.outputs[0].token_ids
    assert partials[-1].outputs[0].text == final.outputs[0].text


def test_stream_async(default_engine):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def consume(prompt):
        return [out async for out in default_engine.stream_async(prompt, params)]

    async def main():
        return await asyncio.gather(consume(PROMPTS[1]), consume(PROMPTS[2]))

    streams = asyncio.run(main())
    for prompt, partials in zip(PROMPTS[1:3], streams):
        assert partials[-1].finished and len(partials) > 1
        assert partials[-1].outputs[0].token_ids == default_engine.generate(prompt, params).outputs[0].token_ids


def test_abort_mid_stream_frees_pages(default_engine):
    allocator = default_engine.core.allocator
    handle = default_engine.submit(PROMPTS[3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    for seen, _ in enumerate(handle):
        if seen == 2:
            assert allocator.num_used > 0
            default_engine.abort(handle.request_id)
            break
    out = handle.result(timeout=30)
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) < 500
    wait_until_idle(default_engine)
    assert allocator.num_free == allocator.num_usable_pages

    stream = default_engine.stream(PROMPTS[4], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    next(stream), next(stream)
    stream.close()  # closing the generator aborts the request
    wait_until_idle(default_engine)
    assert allocator.num_free == allocator.num_usable_pages


def test_stop_without_drain_cancels_cleanly(default_engine):
    handles = [default_engine.submit(p, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
               for p in PROMPTS[:4]]
    next(iter(handles[0]))  # running
    default_engine.stop(drain=False, timeout=60)
    assert not default_engine.is_running and not default_engine._thread.is_alive()
    outs = [h.result(timeout=1) for h in handles]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert default_engine.core.allocator.num_free == default_engine.core.allocator.num_usable_pages
    assert not default_engine.core.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="not running"):
        default_engine.submit(PROMPTS[0])
    default_engine.start()  # restartable; serves again
    assert default_engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3)).finished


def test_static_batching_runs_each_batch_to_completion(tiny_model_dir):
    args = {**TINY_ENGINE_ARGS, "max_batch_size": 2, "max_num_batched_tokens": 16}
    args["max_sequence_length"] = args.pop("max_model_len")
    engine = AutoGLMEngine(args, model=tiny_model_dir, use_dynamic_batching=False).start()
    try:
        scheduled_steps = []
        schedule = engine.core.scheduler.schedule

        def spy(*a, **kw):  # records which sequences each step runs (the engine thread calls this)
            output = schedule(*a, **kw)
            scheduled_steps.append({s.request_id: s for s in output.scheduled})
            return output

        engine.core.scheduler.schedule = spy
        rng = np.random.default_rng(31)
        prompts = [random_prompt(rng, n) for n in (5, 9, 4, 7)]
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 3, 5, 4)]
        handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        outs = [h.result(timeout=120) for h in handles]
        assert [len(o.outputs[0].token_ids) for o in outs] == [20, 3, 5, 4]
        for step in scheduled_steps:  # nobody is admitted while a running sequence decodes
            if any(s.is_new for s in step.values()):
                assert not any(s.is_decode for s in step.values()), f"admitted during decoding: {step}"
        first = {rid: i for i, step in reversed(list(enumerate(scheduled_steps))) for rid in step}
        last = {rid: i for i, step in enumerate(scheduled_steps) for rid in step}
        ids = [h.request_id for h in handles]
        assert first[ids[2]] > last[ids[0]], "the third request must wait for the whole first batch"
        assert engine.core.runner.num_traces == num_ladder_buckets(engine.core.runner)
        assert jit_cache_sizes(engine.core.runner) == (1, 2)
    finally:
        engine.stop(drain=False)


def test_one_step_wakes_each_asyncio_loop_once():
    """Outputs published with a ``wakeups`` dict reach every asyncio consumer through one cross-thread
    call per loop (a step publishes hundreds); a loop closed meanwhile is skipped without an error."""
    from autoglm_jax.engine.async_engine import RequestHandle, wake_loops

    class Output:
        def __init__(self, finished):
            self.finished = finished

    handles = [RequestHandle(f"r{i}") for i in range(20)]
    seen = {h.request_id: [] for h in handles}
    ready, calls = concurrent.futures.Future(), []

    async def consume(handle):
        async for output in handle:
            seen[handle.request_id].append(output.finished)

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (calls.append(args[0]), original(*args))[1]
        tasks = [asyncio.create_task(consume(h)) for h in handles]
        await asyncio.sleep(0.05)  # every consumer waits on its handle
        ready.set_result(loop)
        await asyncio.gather(*tasks)

    with concurrent.futures.ThreadPoolExecutor(1) as client:
        done = client.submit(asyncio.run, main())
        ready.result(timeout=10)
        for finished in (False, True):
            while not all(h._async_waiters for h in handles):  # each consumer awaits its next output
                time.sleep(0.01)
            wakeups: dict = {}
            for handle in handles:
                handle._publish(Output(finished), wakeups=wakeups)
            assert len(wakeups) == 1 and len(next(iter(wakeups.values()))) == len(handles)
            wake_loops(wakeups)
        done.result(timeout=10)
    assert len(calls) == 2, calls  # one call per step, not one per handle
    assert all(outputs == [False, True] for outputs in seen.values()), seen
    closed = asyncio.new_event_loop()
    closed.close()
    wake_loops({closed: [asyncio.Event()]})
