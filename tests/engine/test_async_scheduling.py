"""Async scheduling (``EngineConfig.async_scheduling``): the next decode step is dispatched before the
current one's tokens are read back, its input tokens never leave the device, and the outputs are
exactly those of one step at a time.

Engine tests run the shared tiny engine (``tiny_llm``) twice on the same workload, switching
``core.async_scheduling`` in between (no second compile): every step's outputs identical (greedy and
seeded sampling, logprobs, prompt logprobs, penalties, stop tokens, stop strings through the SmolLM2
byte-level vocabulary, max_tokens; more requests than slots in a pool made tight by holding pages, so
requests wait and are preempted); identical final outputs, logprob values to float rounding, when
requests arrive and one is aborted between steps (they take effect a step later); an abort while a
step ahead holds the request; no recompilation; and the dispatch order that proves the overlap.
Scheduler tests cover ``Scheduler.schedule_ahead`` on its own.
"""

from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import pytest

from autoglm_jax.default_model import default_model_path
from autoglm_jax.engine.request import FinishReason
from autoglm_jax.engine.scheduler import PENDING_TOKEN
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tokenizer import Tokenizer
from tests.engine.conftest import jit_cache_sizes, num_ladder_buckets, random_prompt
from tests.engine.test_engine_recompile import varied_workload
from tests.engine.test_scheduler import make_request, make_scheduler


# ----------------------------------------------------------------------------- engine helpers


@pytest.fixture(scope="module")
def byte_tokenizer():
    """SmolLM2's vocabulary: the tiny model's ids 3..255 decode to printable characters."""
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture
def core(tiny_llm, byte_tokenizer, monkeypatch):
    """The tiny engine's core with a tokenizer (stop strings, text); async scheduling restored after."""
    core = tiny_llm.engine
    monkeypatch.setattr(core, "tokenizer", byte_tokenizer)
    monkeypatch.setattr(core, "async_scheduling", core.async_scheduling)
    yield core
    for request_id in list(core.requests):
        core.abort(request_id)
    while core._in_flight is not None:  # a step planned ahead for requests that finished: drain it
        core.step()


def view(output):
    """Everything a user sees of a RequestOutput except timings."""
    return (output.request_id, output.finished, output.prompt_logprobs,
            [(c.index, c.text, list(c.token_ids), c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
             for c in output.outputs])


def assert_same_but_float_bits(got: dict, want: dict) -> None:
    """Final views equal, logprob values to 1e-5: a request admitted a step later (an arrival between
    steps) may decode a token in a mixed step instead of the decode loop, as one step at a time would if
    it arrived a step later, and the two compute the same logprob with other float rounding."""
    assert got.keys() == want.keys()
    for request_id, (g, w) in ((r, (got[r], want[r])) for r in want):
        (gc,), (wc,) = g[3], w[3]
        assert g[:3] == w[:3] and gc[:3] + gc[5:] == wc[:3] + wc[5:], f"{request_id}: {g} != {w}"
        floats = lambda c: [c[3] or 0.0] + [p.logprob for d in c[4] or [] for p in d.values()]  # noqa: E731
        ranks = lambda c: [(t, p.rank) for d in c[4] or [] for t, p in d.items()]  # noqa: E731
        assert ranks(gc) == ranks(wc), request_id
        np.testing.assert_allclose(floats(gc), floats(wc), rtol=1e-5, atol=1e-6, err_msg=request_id)


def run(core, requests, async_scheduling: bool, events=None):
    """Steps ``requests`` [(prompt, params, request_id)] to the end; returns the views of every step's
    outputs. ``events``: {step index: callable(core)} run before that step (arrivals, aborts)."""
    core.async_scheduling = async_scheduling
    for prompt, params, request_id in requests:
        core.add_request(prompt, params, request_id)
    steps, index = [], 0
    while core.has_unfinished_requests() or (events and index <= max(events)):
        if events and index in events:
            events[index](core)
        steps.append([view(o) for o in core.step()])
        index += 1
    while core._in_flight is not None:
        assert core.step() == [], "a step planned ahead for finished requests produced outputs"
    return steps


def finals(steps) -> dict:
    return {v[0]: v for step in steps for v in step if v[1]}


def first_text(core, prompt, params) -> tuple[list[int], str]:
    """Token ids and text of an unconstrained run (to choose stops that fire mid-run)."""
    (out,) = [o for o in run(core, [(prompt, params, "probe")], False)[-1] if o[0] == "probe"]
    return out[3][0][2], out[3][0][1]


# ----------------------------------------------------------------------------- engine tests


def test_async_outputs_equal_sync_step_by_step(core):
    rng = np.random.default_rng(3)
    prompts = [random_prompt(rng, n) for n in (5, 17, 33, 9)]
    greedy_ids, _ = first_text(core, prompts[2], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop_id = greedy_ids[9]  # stops at its first occurrence, at the latest the 10th token
    _, text = first_text(core, prompts[3], SamplingParams(temperature=1.0, seed=7, max_tokens=25, ignore_eos=True))
    stop_str = text[len(text) // 2 : len(text) // 2 + 2]
    params = [
        SamplingParams(temperature=0, max_tokens=13, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=21, logprobs=2, prompt_logprobs=2, presence_penalty=0.7,
                       frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=25, stop=[stop_str], ignore_eos=True),
    ]
    requests = [(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
    sync = run(core, requests, False)
    asynchronous = run(core, requests, True)
    assert len(asynchronous) == len(sync)
    for index, (want, got) in enumerate(zip(sync, asynchronous)):
        assert got == want, f"step {index} differs:\nsync  {want}\nasync {got}"
    final = finals(sync)
    assert [len(final[f"r{i}"][3][0][2]) for i in (0, 1)] == [13, 21]
    assert final["r2"][3][0][5:] == ("stop", stop_id) and len(final["r2"][3][0][2]) <= 10
    assert final["r3"][3][0][5:] == ("stop", stop_str) and stop_str not in final["r3"][3][0][1]


@contextlib.contextmanager
def tight_pool(core, free_pages: int):
    """Holds all but ``free_pages`` KV pages, as a small pool would (the scheduler must preempt)."""
    held = core.allocator.allocate(core.allocator.num_free - free_pages)
    try:
        yield
    finally:
        core.allocator.free(held)


def test_async_outputs_equal_sync_with_arrivals_abort_and_preemption(core):
    rng = np.random.default_rng(5)
    sampling = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                SamplingParams(temperature=0.9, seed=11, max_tokens=33, logprobs=1, ignore_eos=True),
                SamplingParams(temperature=0, max_tokens=28, frequency_penalty=0.5, ignore_eos=True)]
    requests = [(random_prompt(rng, n), sampling[i % 3], f"r{i}") for i, n in enumerate((20, 27, 12, 31, 5, 18))]
    late = [(random_prompt(rng, n), sampling[i % 3], f"late{i}") for i, n in enumerate((7, 22))]
    aborted = {}

    def abort(c):
        aborted["r1"] = c.requests["r1"]
        assert c.abort("r1")

    events = {4: lambda c: [c.add_request(*r) for r in late], 7: abort}
    results, preemptions, undisturbed = {}, {}, {}
    for mode in (False, True):
        before = core.metrics.num_preemptions
        with tight_pool(core, free_pages=9):
            undisturbed[mode] = run(core, requests + late, mode)  # waiting requests, preemption: exact
            results[mode] = finals(run(core, requests, mode, events))
        preemptions[mode] = core.metrics.num_preemptions - before
        results[mode]["r1"] = view(aborted.pop("r1").output())
    assert preemptions[False] > 0 and preemptions[True] > 0, f"no preemption: {preemptions}"
    assert undisturbed[True] == undisturbed[False]
    assert_same_but_float_bits(results[True], results[False])
    assert len(results[False]) == 8 and results[False]["r1"][3][0][5] == "abort"
    assert 0 < len(results[False]["r1"][3][0][2]) < 33


def test_abort_during_a_step_ahead_then_reuse_of_the_id(core):
    """The step planned ahead still holds the aborted request's row: its tokens are dropped, and a new
    request under the same id is neither fed them nor mistaken for the old one."""
    rng = np.random.default_rng(9)
    prompt, other = random_prompt(rng, 8), random_prompt(rng, 13)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=24, ignore_eos=True)
    (solo,) = [v for v in run(core, [(prompt, params, "x")], False)[-1] if v[0] == "x"]
    core.async_scheduling = True
    core.add_request(other, params, "y")
    core.add_request(prompt, params, "x")
    while core._in_flight is None:
        core.step()
    assert core.abort("x") and not core.abort("x")
    core.add_request(prompt, params, "x")
    outputs = {}
    while core.has_unfinished_requests():
        outputs.update({o.request_id: view(o) for o in core.step() if o.finished})
    assert outputs["x"] == solo
    assert len(outputs["y"][3][0][2]) == 24


def test_next_step_is_dispatched_before_tokens_are_read(core, monkeypatch):
    """The order that only async scheduling produces: step N+1 enqueued (its tokens taken from step
    N's device output) before step N's results are fetched to the host."""
    runner = core.runner
    events = []
    launch = runner._launch

    def dispatch(kind, inp):
        out = launch(kind, inp)  # the program's outputs, or the launch thread's Future of them
        events.append(("dispatch", id(out), bool((np.asarray(inp.token_ids) < 0).any())))
        return out

    monkeypatch.setattr(runner, "_launch", dispatch)
    fetch = runner._fetch
    monkeypatch.setattr(runner, "_fetch", lambda out: events.append(("fetch", id(out), None)) or fetch(out))
    rng = np.random.default_rng(1)
    requests = [(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), f"r{n}")
                for n in (6, 11)]

    def overlapped() -> int:
        """Decode steps fed from the device whose predecessor had not been fetched at dispatch."""
        count, fetched = 0, set()
        for index, (kind, key, from_device) in enumerate(events):
            if kind == "fetch":
                fetched.add(key)
            elif from_device:
                previous = [k for kind_, k, _ in events[:index] if kind_ == "dispatch"][-1]
                count += previous not in fetched
        return count

    for mode in (False, True):
        events.clear()
        run(core, requests, mode)
        num_ahead = overlapped()
        assert (num_ahead > 3) if mode else (num_ahead == 0), f"async={mode}: {num_ahead} overlapped steps {events}"


def test_a_mixed_steps_successor_is_dispatched_before_its_outputs_are_built(core, monkeypatch):
    """A mixed step (prefill chunks: the scheduler cannot plan the next step without its tokens) is
    followed, once its tokens are applied, by the next step's dispatch, before its outputs are built --
    so building them and the caller's work between ``step()`` calls overlap the device."""
    records, processing = [], []
    process, collect = core._process, core._collect

    def spy_process(current, changed):
        processing.append(current.output.num_prefill_tokens > 0)
        return process(current, changed)

    def spy_collect(changed):
        if processing:
            records.append((processing.pop(), core._in_flight is not None, core.has_unfinished_requests()))
        return collect(changed)

    monkeypatch.setattr(core, "_process", spy_process)
    monkeypatch.setattr(core, "_collect", spy_collect)
    rng = np.random.default_rng(3)
    requests = [(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), f"m{n}")
                for n in (90, 7, 70)]  # 90 and 70 tokens: prefilled over several 32-token steps
    for mode in (False, True):
        records.clear()
        run(core, requests, mode)
        mixed = [in_flight for is_mixed, in_flight, unfinished in records if is_mixed and unfinished]
        assert len(mixed) >= 4, records
        assert all(mixed) if mode else not any(mixed), f"async={mode}: {records}"


def test_compiled_steps_run_on_the_launch_thread(core, monkeypatch):
    """``dispatch`` hands a compiled program to the runner's launch thread and returns: ``step()`` comes
    back (with the step ahead dispatched) while that program's call is still held on the other thread --
    as on a GPU, where XLA keeps the calling thread inside a decode call's ``while`` loop. A program
    called on the engine's own thread would hold ``step()`` until the call's hold timed out."""
    runner, release, entered = core.runner, threading.Event(), threading.Event()
    threads, released = [], []
    original = runner._run_decode

    def held(inp):
        threads.append(threading.current_thread().name)
        entered.set()
        released.append(release.wait(20))
        return original(inp)

    monkeypatch.setattr(runner, "_run_decode", held)
    core.async_scheduling = True
    rng = np.random.default_rng(2)
    for n in (5, 9):
        core.add_request(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), f"h{n}")
    for _ in range(20):  # prefill, then the step that dispatches the first decode call ahead
        core.step()
        if entered.wait(2):
            break
    assert threads and threads[0].startswith("autoglm-launch"), f"decode call made on {threads}"
    assert not released, "step() waited for the held decode call"
    release.set()
    while core.has_unfinished_requests() or core._in_flight is not None:
        core.step()
    assert released and all(released), "a decode call's hold timed out: step() waited for it"
    assert all(name.startswith("autoglm-launch") for name in threads), threads


def test_no_recompilation_with_async_scheduling(tiny_llm, core):
    runner = core.runner
    traces, caches = runner.num_traces, jit_cache_sizes(runner)
    prompts, params = varied_workload(np.random.default_rng(8))
    core.async_scheduling = True
    tiny_llm.generate(prompts, params, use_tqdm=False)
    tiny_llm.generate(prompts[:3], params[:3], use_tqdm=False)
    assert runner.num_traces == traces, f"{runner.num_traces - traces} retraces with async scheduling"
    assert jit_cache_sizes(runner) == caches, f"jit caches grew from {caches} to {jit_cache_sizes(runner)}"
    assert sum(caches) == num_ladder_buckets(runner), f"jit signatures {caches} != one per ladder bucket"


# ----------------------------------------------------------------------------- Scheduler.schedule_ahead


def _decoding_scheduler(prompts=(5, 6), max_tokens=(16, 3), **overrides):
    """A scheduler whose requests finished prefill and sampled once; their first decode call pending."""
    scheduler = make_scheduler(**overrides)
    requests = [make_request(f"r{i}", n, m) for i, (n, m) in enumerate(zip(prompts, max_tokens))]
    for request in requests:
        scheduler.add_request(request)
    scheduler.update({e.request_id: [7] for e in scheduler.schedule().scheduled})
    return scheduler, requests, scheduler.schedule(3)


def test_schedule_ahead_plans_the_step_after_the_pending_one():
    scheduler, (a, b), pending = _decoding_scheduler()
    num_sampled = {e.request_id: 1 + e.num_lookahead_tokens for e in pending.scheduled}
    assert num_sampled == {"r0": 4, "r1": 2}  # r1 may generate 3 tokens in all: 1 sampled, 2 to go
    ahead = scheduler.schedule_ahead(3, num_sampled)
    (entry,) = ahead.scheduled  # r1 reaches max_tokens with the pending step: left out
    assert entry.request_id == "r0" and entry.token_ids == (PENDING_TOKEN,) and entry.is_decode and entry.sample
    assert entry.start_position == a.num_tokens + 4 - 1 and entry.num_lookahead_tokens == 3
    assert len(a.pages) * 4 >= entry.end_position + 3 and entry.page_ids == tuple(a.pages)
    with pytest.raises(RuntimeError):
        scheduler.schedule()
    rng = random.Random(0)
    tokens = {"r0": [rng.randrange(9, 99) for _ in range(4)], "r1": [5, 6]}
    assert scheduler.update(tokens) == ("r1",)
    assert a.num_computed_tokens == entry.start_position and a.output_token_ids == [7] + tokens["r0"]
    scheduler.finish("r0", FinishReason.STOP)  # finished while the step ahead ran: its tokens are dropped
    assert scheduler.update({}) == () and not scheduler.has_unfinished
    assert scheduler.allocator.num_free == scheduler.allocator.num_usable_pages


def test_schedule_ahead_declines_what_only_the_pending_tokens_decide():
    scheduler, _, pending = _decoding_scheduler(max_tokens=(16, 16))
    assert scheduler.schedule_ahead(3, {"r0": 4}) is None  # r1 samples nothing in the pending step
    scheduler, _, pending = _decoding_scheduler(max_tokens=(40, 40), num_pages=8)
    free = scheduler.allocator.num_free
    assert scheduler.schedule_ahead(3, {"r0": 4, "r1": 4}) is None  # its pages would need a preemption
    assert scheduler.allocator.num_free == free, "a declined plan allocated pages"


@pytest.mark.parametrize("num_pages, admitted", [(8, True), (7, False)])
def test_schedule_ahead_with_a_waiting_request(num_pages, admitted):
    """With a free slot, the plan is made only if the waiting request's first chunk could not get a page
    anyway (with 7 pages the decodes hold all 6 usable ones): one step at a time would not admit it."""
    scheduler, _, pending = _decoding_scheduler(max_tokens=(40, 40), num_pages=num_pages)
    scheduler.add_request(make_request("waiting", 4))
    ahead = scheduler.schedule_ahead(0, {"r0": 4, "r1": 4})
    assert (ahead is None) == admitted
    if not admitted:
        assert [e.num_lookahead_tokens for e in ahead.scheduled] == [0, 0] and scheduler.allocator.num_free == 0


def test_schedule_ahead_counts_the_slot_a_length_limit_frees():
    """Slots full; r1 reaches max_tokens with the pending step, so the step after it admits the waiting
    request one step at a time: no plan ahead. Without that, a plan (nothing could be admitted)."""
    scheduler, _, pending = _decoding_scheduler(max_tokens=(16, 3), max_batch_size=2)
    scheduler.add_request(make_request("waiting", 4))
    assert scheduler.schedule_ahead(0, {e.request_id: 1 + e.num_lookahead_tokens for e in pending.scheduled}) is None
    scheduler, _, pending = _decoding_scheduler(max_tokens=(16, 16), max_batch_size=2)
    scheduler.add_request(make_request("waiting", 4))
    assert scheduler.schedule_ahead(0, {"r0": 4, "r1": 4}) is not None

