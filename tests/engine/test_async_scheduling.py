"""Async scheduling (``EngineConfig.async_scheduling``): the next step (a decode call or a mixed step) is
dispatched before the current one's tokens are read back, its input tokens never leave the device, and
the outputs are exactly those of one step at a time.

Engine tests run the shared tiny engine (``tiny_llm``) twice on the same workload, switching
``core.async_scheduling`` in between (no second compile): every step's outputs identical (greedy and
seeded sampling, logprobs, prompt logprobs, penalties, stop tokens, stop strings through the SmolLM2
byte-level vocabulary, max_tokens; more requests than slots in a pool made tight by holding pages, so
requests wait and are preempted); identical final outputs, logprob values to float rounding, when
requests arrive and one is aborted between steps (they take effect a step later); an abort while a
step ahead holds the request; no recompilation; and the dispatch order that proves the overlap.
Scheduler tests cover ``Scheduler.schedule_ahead`` on its own, and a property test checks that the steps
it plans equal those one step at a time plans after each update (no early stops).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import threading
import time

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from autoglm_jax.default_model import default_model_path
from autoglm_jax.engine.request import FinishReason, RequestStatus
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
    N's device output) before step N's results are fetched to the host -- decode calls and mixed steps."""
    runner = core.runner
    events = []
    launch = runner._launch

    def dispatch(kind, inp):
        out = launch(kind, inp)  # the program's outputs, or the launch thread's Future of them
        events.append(("dispatch", out, kind if (np.asarray(inp.token_ids) < 0).any() else None))
        return out

    monkeypatch.setattr(runner, "_launch", dispatch)
    fetch = runner._fetch
    # events hold the outputs themselves, not their id(): a step's Future freed once fetched (when the launch
    # thread lets go of it: timing) could hand its id to the next step's Future, which then read as fetched
    monkeypatch.setattr(runner, "_fetch", lambda out: events.append(("fetch", out, None)) or fetch(out))
    rng = np.random.default_rng(1)
    # 6 and 11 tokens decode together; 90 and 70 arrive with them and prefill over several 32-token mixed
    # steps next to those decodes, whose tokens the mixed steps take from the device too
    requests = [(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), f"r{n}")
                for n, m in ((6, 30), (11, 30), (90, 4), (70, 4))]

    def overlapped() -> dict[str, int]:
        """Steps fed from the device whose predecessor had not been fetched at dispatch, by program."""
        count, fetched = {"decode": 0, "mixed": 0}, set()
        for index, (event, key, from_device) in enumerate(events):
            if event == "fetch":
                fetched.add(id(key))
            elif from_device:
                previous = [k for event_, k, _ in events[:index] if event_ == "dispatch"][-1]
                count[from_device] += id(previous) not in fetched
        return count

    def trace() -> list:
        return [(event, id(key), from_device) for event, key, from_device in events]

    for mode in (False, True):
        events.clear()
        run(core, requests, mode)
        num_ahead = overlapped()
        if mode:
            assert num_ahead["decode"] > 3 and num_ahead["mixed"] >= 3, f"{num_ahead} overlapped steps {trace()}"
        else:
            assert num_ahead == {"decode": 0, "mixed": 0}, f"sync: {num_ahead} overlapped steps {trace()}"


def test_a_mixed_steps_successor_is_dispatched_before_its_outputs_are_built(core, monkeypatch):
    """A mixed step (prefill chunks) is followed by the next step's dispatch before its outputs are built
    -- planned ahead, or once its tokens are applied where only they decide the plan -- so building them
    and the caller's work between ``step()`` calls overlap the device."""
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


class _SlowPickup(concurrent.futures.ThreadPoolExecutor):
    """A launch thread that takes each handed-over call up 20 ms late (as one waiting for the GIL; under
    the runner's HANDOFF_TIMEOUT_S)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(lambda: (time.sleep(0.02), fn(*args, **kwargs))[1])


def test_collect_returns_once_the_next_program_call_began(core, monkeypatch):
    """After a launched call returns, the next program must start before the engine thread takes the GIL
    for the returned call's tokens: ``collect`` of call k returns only once call k + 1 (when handed over
    already) has begun, even when the launch thread is slow to take it up."""
    runner, events = core.runner, []
    monkeypatch.setattr(runner, "_launcher", _SlowPickup(1, thread_name_prefix="autoglm-launch"))
    for name in ("_run_mixed", "_run_decode"):
        original = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda inp, original=original: (events.append("call"), original(inp))[1])
    for name, event in (("dispatch", "dispatch"), ("collect", "collected")):
        original = getattr(runner, name)

        def wrapped(*args, original=original, event=event):
            result = original(*args)
            events.append(event)
            return result
        monkeypatch.setattr(runner, name, wrapped)
    core.async_scheduling = True
    rng = np.random.default_rng(4)
    for n in (5, 9, 40):
        core.add_request(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), f"n{n}")
    while core.has_unfinished_requests() or core._in_flight is not None:
        core.step()
    checked = 0
    for k, at in enumerate(i for i, event in enumerate(events) if event == "collected"):
        before = events[:at]
        handed_over = before.count("dispatch")
        assert before.count("call") >= min(handed_over, k + 2), f"collect {k}: {before}"
        checked += handed_over >= k + 2
    assert checked >= 3, events


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
    """A free slot: the plan admits the waiting request (a mixed step; its decodes feed PENDING_TOKEN) when
    its first chunk gets a page -- with 7 pages the decodes hold all 6 usable ones, and the plan is the
    decodes alone, as one step at a time would make."""
    scheduler, _, pending = _decoding_scheduler(max_tokens=(40, 40), num_pages=num_pages)
    waiting = make_request("waiting", 4)
    scheduler.add_request(waiting)
    ahead = scheduler.schedule_ahead(0, {"r0": 4, "r1": 4})
    entries = [(e.request_id, e.token_ids, e.is_new, e.is_decode) for e in ahead.scheduled]
    decodes = [("r0", (PENDING_TOKEN,), False, True), ("r1", (PENDING_TOKEN,), False, True)]
    if admitted:
        assert entries == decodes + [("waiting", waiting.prompt_token_ids, True, False)]
        assert scheduler.running[-1] is waiting and scheduler.num_waiting == 0
    else:
        assert entries == decodes and scheduler.allocator.num_free == 0
        assert scheduler.waiting == (waiting,)


def test_schedule_ahead_gives_the_slot_a_length_limit_frees():
    """Slots full; r1 reaches max_tokens with the pending step: its slot and pages are released at once,
    and the plan admits the waiting request into them, as one step at a time would after the update."""
    scheduler, (r0, r1), pending = _decoding_scheduler(max_tokens=(16, 3), max_batch_size=2)
    waiting = make_request("waiting", 4)
    scheduler.add_request(waiting)
    r1_slot = r1.slot
    ahead = scheduler.schedule_ahead(3, {e.request_id: 1 + e.num_lookahead_tokens for e in pending.scheduled})
    entries = [(e.request_id, e.is_new, e.num_lookahead_tokens) for e in ahead.scheduled]
    assert entries == [("r0", False, 0), ("waiting", True, 0)]
    assert waiting.slot == r1_slot and r1.pages == [] and scheduler.running == (r0, waiting)
    with pytest.raises(RuntimeError, match="planned to reach their length limit"):
        scheduler._check_released_ahead()  # until update() finishes r1
    assert scheduler.update({"r0": [1, 2, 3, 4], "r1": [5, 6]}) == ("r1",)
    assert r1.finish_reason is FinishReason.LENGTH and r1.output_token_ids == [7, 5, 6]
    scheduler.update({"r0": [8], "waiting": [9]})
    allocator = scheduler.allocator
    assert allocator.num_free + sum(len(r.pages) for r in scheduler.running) == allocator.num_usable_pages


def test_schedule_ahead_released_request_that_stops_early_is_finished_by_the_engine():
    """r1 was planned to reach its limit but stops at its first token: update() leaves it running-but-
    released, the engine's finish(STOP) ends it, and nothing is released twice."""
    scheduler, (r0, r1), pending = _decoding_scheduler(max_tokens=(16, 3), max_batch_size=2)
    assert scheduler.schedule_ahead(3, {"r0": 4, "r1": 2}) is not None
    assert scheduler.update({"r0": [1, 2, 3, 4], "r1": [5]}) == ()
    with pytest.raises(RuntimeError, match="sampled fewer tokens|must be finished"):
        scheduler.schedule_ahead(3, {"r0": 4})
    scheduler.finish("r1", FinishReason.STOP)
    assert r1.finish_reason is FinishReason.STOP and r1.pages == [] and r1.slot is None
    scheduler.update({"r0": [6, 7, 8, 9]})
    assert scheduler.allocator.num_free + len(r0.pages) == scheduler.allocator.num_usable_pages


def test_a_declined_plan_ahead_takes_back_its_pages_and_admissions():
    """The plan grows r0 and r1 by a page each, admits "small", then meets "huge", whose 50-token chunk
    can never fit the 11-page pool (an ERROR only ``schedule`` gives, after the update): everything it did
    is undone exactly -- the free list in its order, the queue, slots, statuses."""
    scheduler, (r0, r1), pending = _decoding_scheduler(prompts=(8, 8), max_tokens=(40, 40), num_pages=12,
                                                       max_num_batched_tokens=64, prefill_ratio=1.0)
    small, huge = make_request("small", 3), make_request("huge", 50)
    scheduler.add_request(small)
    scheduler.add_request(huge)
    free, slots = list(scheduler.allocator._free), sorted(scheduler._free_slots)
    pages = (list(r0.pages), list(r1.pages))
    assert scheduler.schedule_ahead(0, {"r0": 4, "r1": 4}) is None
    assert list(scheduler.allocator._free) == free and sorted(scheduler._free_slots) == slots
    assert (r0.pages, r1.pages) == pages and scheduler.running == (r0, r1) and scheduler.waiting == (small, huge)
    assert small.slot is None and small.pages == [] and small.status is RequestStatus.WAITING
    assert (r0.num_computed_tokens, r0.output_token_ids) == (8, [7]), "the state after the pending step leaked"
    assert scheduler.update({"r0": [1, 2, 3, 4], "r1": [5, 6, 7, 8]}) == ()
    out = scheduler.schedule()  # one step at a time: huge fails, small is admitted
    assert out.finished == ("huge",) and "small" in {e.request_id for e in out.scheduled}


# ----------------------------------------------------------------------------- plans ahead == plans after


def _token(request_id: str, position: int) -> int:
    return random.Random(f"{request_id}@{position}").randrange(1, 50_000)


def _tokens(scheduler, output) -> dict[str, list[int]]:
    """Every sampling sequence's tokens as the runner gives them: 1 + its lookahead, up to its length
    limit; token values keyed by (request, position), so two schedulers get the same ones."""
    tokens = {}
    for e in output.scheduled:
        if e.sample:
            limit = scheduler._max_total_tokens(scheduler.get_request(e.request_id))
            count = min(1 + e.num_lookahead_tokens, limit - e.end_position)
            tokens[e.request_id] = [_token(e.request_id, e.end_position + i) for i in range(count)]
    return tokens


def _shape(requests: dict, output) -> list[tuple]:
    """An output as it reaches the device, PENDING_TOKEN replaced by the token it stands for (known once
    the step before is applied); page and slot numbers left out (the order pages were freed in differs)."""
    rows = []
    for e in output.scheduled:
        history = requests[e.request_id].all_token_ids
        tokens = tuple(history[e.start_position + i] if t == PENDING_TOKEN else t for i, t in enumerate(e.token_ids))
        rows.append((e.request_id, e.start_position, tokens, e.sample, e.is_new, e.is_decode, e.num_lookahead_tokens,
                     len(e.page_ids)))
    return rows


def _serve(scheduler, specs, max_lookahead: int, ahead: bool) -> tuple[list, int]:
    """Runs requests (prompt tokens, max_tokens) queued at the start to the end, the way the engine does:
    with ``ahead``, each step after the first is planned by schedule_ahead while its predecessor is
    pending (or by schedule after the update when declined). Returns the shapes of the steps as they run
    and how many were planned ahead."""
    requests = {f"q{i}": make_request(f"q{i}", n, m) for i, (n, m) in enumerate(specs)}
    for request in requests.values():
        scheduler.add_request(request)
    shapes, planned_ahead, pending = [], 0, None
    for _ in range(1000):
        if pending is None:
            pending = scheduler.schedule(scheduler.next_lookahead(max_lookahead))
            if pending.is_empty:  # nothing left, or only a request failed as never fitting
                pending = None
                if not scheduler.has_unfinished:
                    break
                continue
        tokens = _tokens(scheduler, pending)
        nxt = scheduler.schedule_ahead(max_lookahead, {i: len(t) for i, t in tokens.items()}) if ahead else None
        scheduler.update(tokens)
        shapes.append(_shape(requests, pending))
        planned_ahead += nxt is not None
        pending = nxt
    assert not scheduler.has_unfinished
    assert scheduler.allocator.num_free == scheduler.allocator.num_usable_pages
    return shapes, planned_ahead


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    specs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=8),
    max_batch_size=st.integers(1, 4), num_pages=st.integers(6, 40), max_lookahead=st.integers(0, 3),
    budget=st.sampled_from([8, 16]), dynamic=st.booleans())
def test_plans_ahead_equal_plans_after_the_update(specs, max_batch_size, num_pages, max_lookahead, budget, dynamic):
    """Without early stops, the steps run with async scheduling are exactly those of one step at a time:
    same sequences, positions, tokens (PENDING_TOKEN standing for the right one), flags and lookahead --
    through chunked prefill, admissions into slots a length limit frees, preemption and never-fitting
    requests (declined ahead, decided after the update)."""
    make = lambda: make_scheduler(num_pages=num_pages, page_size=4, max_batch_size=max_batch_size,  # noqa: E731
                                  max_num_batched_tokens=budget, max_sequence_length=40, prefill_ratio=0.5,
                                  use_dynamic_batching=dynamic)
    want, _ = _serve(make(), specs, max_lookahead, ahead=False)
    got, planned_ahead = _serve(make(), specs, max_lookahead, ahead=True)
    assert got == want
    hypothesis.event("some planned ahead" if planned_ahead else "none planned ahead")


def test_mixed_steps_are_planned_ahead():
    """A fixed workload with chunked prefill behind decodes: most steps, mixed ones included, are planned
    ahead, and they equal one step at a time."""
    specs = [(30, 12), (9, 6), (25, 10), (4, 12), (17, 3), (12, 8)]
    make = lambda: make_scheduler(num_pages=40, max_batch_size=3, max_num_batched_tokens=8)  # noqa: E731
    want, _ = _serve(make(), specs, 2, ahead=False)
    got, planned_ahead = _serve(make(), specs, 2, ahead=True)
    assert got == want
    mixed = [shape for shape in got[1:] if any(not row[5] for row in shape)]
    assert len(mixed) >= 8 and planned_ahead >= len(got) - 2, (len(mixed), planned_ahead, len(got))

