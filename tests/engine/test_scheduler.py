"""Scheduler policies (unit tests) and a hypothesis property test over random operation sequences."""

from __future__ import annotations

import dataclasses
import random

import hypothesis
import hypothesis.strategies as st
import pytest

from autoglm_jax.engine.buckets import BucketLadder
from autoglm_jax.engine.page_allocator import PageAllocator
from autoglm_jax.engine.request import FinishReason, Request, RequestStatus
from autoglm_jax.engine.scheduler import PENDING_TOKEN, Scheduler, SchedulerConfig, SchedulerOutput
from autoglm_jax.engine.step_plan import StepPlan


@dataclasses.dataclass(frozen=True)
class Params:
    max_tokens: int | None = 16
    n: int = 1


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def make_scheduler(num_pages=64, page_size=4, **overrides) -> Scheduler:
    fields = dict(max_batch_size=4, max_num_batched_tokens=16, page_size=page_size, max_sequence_length=64)
    fields.update(overrides)
    return Scheduler(SchedulerConfig(**fields), PageAllocator(num_pages, page_size), clock=FakeClock())


def make_request(request_id: str, num_prompt: int, max_tokens: int | None = 16, seed: int = 0) -> Request:
    rng = random.Random(f"{request_id}-{seed}")
    prompt = [rng.randrange(1, 50_000) for _ in range(num_prompt)]
    return Request(request_id, prompt, Params(max_tokens), arrival_time=0.0)


def sample_all(output: SchedulerOutput, rng: random.Random, extra: int = 0) -> dict[str, list[int]]:
    """A token for every sequence that samples (plus ``extra`` lookahead tokens where allowed)."""
    return {
        seq.request_id: [rng.randrange(1, 50_000) for _ in range(1 + min(extra, seq.num_lookahead_tokens))]
        for seq in output.scheduled
        if seq.sample
    }


def by_id(output: SchedulerOutput):
    return {seq.request_id: seq for seq in output.scheduled}


# ----------------------------------------------------------------------------- policies


def test_prefill_then_decode_feeds_last_sampled_token():
    scheduler = make_scheduler()
    request = make_request("a", 6)
    scheduler.add_request(request)
    out = scheduler.schedule()
    (seq,) = out.scheduled
    assert seq.token_ids == request.prompt_token_ids and seq.start_position == 0
    assert seq.sample and seq.is_new and not seq.is_decode and seq.slot == 0
    assert seq.page_ids == tuple(request.pages) and len(seq.page_ids) == 2  # 6 tokens / page_size 4
    assert scheduler.update({"a": [777]}) == ()
    assert request.output_token_ids == [777] and request.num_computed_tokens == 6
    (seq,) = scheduler.schedule().scheduled
    assert seq.token_ids == (777,) and seq.start_position == 6 and seq.is_decode and not seq.is_new


@pytest.mark.parametrize("prefill_ratio,expected", [
    (15 / 64, 15),  # share 15: 1 decode + 15 = 16 tokens, exactly the smallest bucket
    (0.25, 31),     # share 16: 1 + 16 pads to the 32-token bucket anyway, so prefill fills the padding
    (0.5, 63),      # share 32: 1 + 32 pads to 64
])
def test_decodes_first_and_prefill_limited_to_its_share_padded_to_the_step_bucket(prefill_ratio, expected):
    scheduler = make_scheduler(max_num_batched_tokens=64, prefill_ratio=prefill_ratio, max_sequence_length=128)  # buckets 16, 32, 64
    scheduler.add_request(make_request("old", 5))
    scheduler.update(sample_all(scheduler.schedule(), random.Random(0)))
    scheduler.add_request(make_request("new", 100))
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["old", "new"]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == expected
    assert not by_id(out)["new"].sample


def test_prefill_takes_whole_budget_without_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=16, prefill_ratio=0.25)
    scheduler.add_request(make_request("a", 30))
    out = scheduler.schedule()
    assert out.num_prefill_tokens == 16


def test_chunked_prefill_covers_prompt_exactly_once():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    request = make_request("a", 37)
    scheduler.add_request(request)
    fed, starts = [], []
    while True:
        (seq,) = scheduler.schedule().scheduled
        fed.extend(seq.token_ids)
        starts.append(seq.start_position)
        assert len(seq.page_ids) * 4 >= seq.end_position
        scheduler.update({"a": [1]} if seq.sample else {})
        if seq.sample:
            break
    assert tuple(fed) == request.prompt_token_ids and starts == [0, 16, 32]


def test_max_prefill_chunk_tokens_shares_a_step_between_prompts():
    scheduler = make_scheduler(max_num_batched_tokens=16, max_prefill_chunk_tokens=6)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("b", 20))
    out = scheduler.schedule()
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 6), ("b", 6)]


def test_without_chunking_prompt_waits_for_a_budget_that_holds_it_whole():
    scheduler = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False, prefill_ratio=0.25)
    scheduler.add_request(make_request("a", 4))
    scheduler.update(sample_all(scheduler.schedule(), random.Random(0)))
    scheduler.add_request(make_request("b", 40))  # > prefill cap while "a" decodes: share 16, widened to bucket 32 - 1
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["a"]
    scheduler.update(sample_all(out, random.Random(1)))
    scheduler.abort("a")
    (seq,) = scheduler.schedule().scheduled
    assert seq.request_id == "b" and seq.num_tokens == 40


def test_max_batch_size_and_slot_reuse():
    scheduler = make_scheduler(max_batch_size=2)
    for name in "abc":
        scheduler.add_request(make_request(name, 3))
    out = scheduler.schedule()
    assert {s.request_id: s.slot for s in out.scheduled} == {"a": 0, "b": 1}
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    scheduler.update(sample_all(out, random.Random(0)))
    scheduler.finish("a", FinishReason.STOP)
    out = scheduler.schedule()
    assert by_id(out)["c"].slot == 0 and by_id(out)["c"].is_new


def test_static_batching_runs_batch_to_completion_before_admitting():
    scheduler = make_scheduler(max_batch_size=2, use_dynamic_batching=False)
    scheduler.add_request(make_request("a", 3, max_tokens=3))
    scheduler.add_request(make_request("b", 3, max_tokens=2))
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))
    scheduler.add_request(make_request("c", 3))
    finished = []
    while "a" not in finished:
        out = scheduler.schedule()
        assert "c" not in by_id(out), "static batching admitted into a decoding batch"
        finished.extend(scheduler.update(sample_all(out, rng)))
    assert set(finished) == {"a", "b"}
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["c"]


def drive_static(scheduler, rng, steps):
    """Run ``steps`` steps; returns the set of request ids admitted (``is_new``) in them."""
    admitted = set()
    for _ in range(steps):
        out = scheduler.schedule()
        admitted |= {s.request_id for s in out.scheduled if s.is_new}
        scheduler.update(sample_all(out, rng))
    return admitted


def static_scheduler(requests=(), **overrides):
    """Static batching, batches of 4, 16-token steps that prefill may fill; ``requests``: (id, prompt tokens,
    max_tokens) queued in order."""
    scheduler = make_scheduler(**{"max_batch_size": 4, "max_num_batched_tokens": 16, "prefill_ratio": 1.0,
                                  "use_dynamic_batching": False, **overrides})
    for request_id, num_tokens, max_tokens in requests:
        scheduler.add_request(make_request(request_id, num_tokens, max_tokens=max_tokens))
    return scheduler


def finish_batch(scheduler, rng, members, outsider):
    """Steps until every request of ``members`` finished, checking ``outsider`` is never scheduled; the
    finished ids in order."""
    finished = []
    while not set(members) <= set(finished):
        out = scheduler.schedule()
        assert outsider not in by_id(out), f"{outsider}, not a member of the running batch, joined it"
        finished.extend(scheduler.update(sample_all(out, rng)))
    return finished


def test_static_batch_fills_over_several_steps_when_the_token_budget_admits_only_some():
    # budget 16 holds two 8-token prompts: the batch of 4 is admitted over two steps, the first two members
    # decoding in the second (the old rule closed admission once a and b decoded: batches of 2)
    scheduler = static_scheduler([(name, 8, 6) for name in "abcde"])
    rng = random.Random(0)
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    scheduler.update(sample_all(out, rng))
    assert not scheduler.admission_blocked(), "c is a member still waiting and fits"
    out = scheduler.schedule()  # 2 decodes + c (8) + d's first 6 tokens
    assert {s.request_id: (s.is_new, s.num_tokens) for s in out.scheduled} == {
        "a": (False, 1), "b": (False, 1), "c": (True, 8), "d": (True, 6)}
    assert "e" not in by_id(out), "e is not a member: the batch is the first max_batch_size requests"
    scheduler.update(sample_all(out, rng))
    assert scheduler.num_running == 4 and [r.request_id for r in scheduler.waiting] == ["e"]
    assert scheduler.admission_blocked(), "every member admitted: e waits for the next batch"
    assert sorted(finish_batch(scheduler, rng, "abcd", outsider="e")) == list("abcd")
    assert not scheduler.admission_blocked()
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["e"]


def test_static_batch_excludes_requests_arriving_after_it_formed():
    # a's prompt takes two steps; late arrives in between, while nobody decodes and slots are free (the old
    # rule admitted it then)
    scheduler = make_scheduler(max_batch_size=4, max_num_batched_tokens=8, use_dynamic_batching=False)
    scheduler.add_request(make_request("a", 12, max_tokens=3))
    rng = random.Random(0)
    out = scheduler.schedule()  # the batch forms: {a}
    assert [s.request_id for s in out.scheduled] == ["a"] and not out.scheduled[0].sample
    scheduler.update(sample_all(out, rng))
    scheduler.add_request(make_request("late", 3))
    assert scheduler.admission_blocked()
    finish_batch(scheduler, rng, "a", outsider="late")
    assert not scheduler.admission_blocked()
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["late"]


def test_static_batch_excludes_late_arrival_while_members_still_wait():
    scheduler = static_scheduler([(name, 8, 8) for name in "abc"])
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))  # a, b admitted; c a waiting member
    scheduler.add_request(make_request("late", 2))  # would fit the step's budget behind c
    admitted = drive_static(scheduler, rng, 3)
    assert admitted == {"c"}, "only the waiting member joins; late waits although a slot is free"
    assert scheduler.num_running == 3 and scheduler.admission_blocked()


def test_static_batch_readmits_a_preempted_member_before_later_arrivals():
    # 5 usable pages of 2 tokens: old and new (4-token prompts, 6 new tokens) cannot both finish in the pool
    scheduler = make_scheduler(num_pages=6, page_size=2, max_batch_size=2, max_sequence_length=20,
                               use_dynamic_batching=False)
    old, new = make_request("old", 4, max_tokens=6), make_request("new", 4, max_tokens=6)
    scheduler.add_request(old)
    scheduler.add_request(new)
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))  # the batch {old, new} is admitted
    scheduler.add_request(make_request("late", 2, max_tokens=2))
    readmitted, finished = False, []
    for _ in range(60):
        out = scheduler.schedule()
        seq = by_id(out).get("new")
        readmitted |= bool(new.num_preemptions) and seq is not None and seq.is_new
        finished.extend(scheduler.update(sample_all(out, rng)))
        if not scheduler.has_unfinished:
            break
    assert new.num_preemptions >= 1 and readmitted, "the preempted member was re-admitted"
    assert finished == ["old", "new", "late"], "late ran only after the whole batch, preempted member included"


def test_static_batch_preempted_member_alone_in_queue_keeps_the_batch_open():
    scheduler = make_scheduler(max_batch_size=2, use_dynamic_batching=False)
    scheduler.add_request(make_request("a", 3))
    scheduler.add_request(make_request("b", 3))
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))
    scheduler.add_request(make_request("late", 3))
    plan = StepPlan(scheduler.config, 0)
    scheduler._preempt(scheduler.get_request("b"), plan)  # as _reserve_pages does when pages run out
    assert [r.request_id for r in scheduler.waiting] == ["b", "late"]
    assert not scheduler.admission_blocked(), "b is still a member and fits"
    out = scheduler.schedule()
    assert {s.request_id: s.is_new for s in out.scheduled} == {"a": False, "b": True}
    scheduler.update(sample_all(out, rng))
    assert scheduler.admission_blocked()


@pytest.mark.parametrize("how", ["abort", "stop"])
def test_static_batch_member_finished_while_waiting_does_not_hold_the_batch_open(how):
    scheduler = static_scheduler([(name, 8, 2) for name in "abc"])
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))  # a, b admitted; c a waiting member
    scheduler.add_request(make_request("late", 3))
    if how == "abort":
        assert scheduler.abort("c")
    else:
        scheduler.finish("c", FinishReason.STOP)
    assert scheduler.admission_blocked(), "no member waits: late is not admitted into the running batch"
    finish_batch(scheduler, rng, "ab", outsider="late")
    assert not scheduler.admission_blocked()
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["late"], "the next batch forms"


def test_static_batch_member_that_never_fits_does_not_hold_the_batch_open():
    scheduler = make_scheduler(num_pages=5, page_size=2, max_batch_size=4, max_num_batched_tokens=16,
                               max_sequence_length=32, prefill_ratio=1.0, use_dynamic_batching=False)  # 4 pages
    scheduler.add_request(make_request("a", 6, max_tokens=2))  # 3 pages, then 4
    scheduler.add_request(make_request("b", 4, max_tokens=3))  # 2 pages: waits until a is done
    scheduler.add_request(make_request("huge", 10, max_tokens=2))  # 5 pages: never fits
    rng = random.Random(0)
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["a"]
    scheduler.update(sample_all(out, rng))
    scheduler.add_request(make_request("late", 2, max_tokens=1))
    assert scheduler.update(sample_all(scheduler.schedule(), rng)) == ("a",)
    assert not scheduler.admission_blocked(), "b and huge are still waiting members"
    out = scheduler.schedule()
    assert out.finished == ("huge",) and [s.request_id for s in out.scheduled] == ["b"], "late is not a member"
    scheduler.update(sample_all(out, rng))
    assert scheduler.admission_blocked(), "no member waits any more: late waits for b"
    finish_batch(scheduler, rng, "b", outsider="late")
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["late"], "the next batch forms"


def test_static_batching_schedule_ahead_plans_only_when_no_member_waits():
    scheduler = static_scheduler([(name, 8, 8) for name in "abc"])
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))  # a, b admitted and decoding; c waits
    scheduler.schedule()  # pending: a, b decode; c's prefill samples too
    out = scheduler._pending
    assert set(by_id(out)) == {"a", "b", "c"}
    scheduler.update(sample_all(out, rng))
    scheduler.add_request(make_request("late", 2))
    out = scheduler.schedule()  # a, b, c decode; late is not a member
    assert set(by_id(out)) == {"a", "b", "c"}
    ahead = scheduler.schedule_ahead(0, {rid: 1 for rid in by_id(out)})
    assert ahead is not None and {s.request_id for s in ahead.scheduled} == {"a", "b", "c"}


def test_static_batching_schedule_ahead_admits_a_waiting_member():
    scheduler = static_scheduler([("a", 8, 8), ("b", 8, 8), ("c", 14, 8), ("d", 3, 8)])  # 8 + 8 + 14 > 16: c waits
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    scheduler.add_request(make_request("late", 2))
    ahead = scheduler.schedule_ahead(0, {"a": 1, "b": 1})
    assert [(s.request_id, s.is_new, s.token_ids[:1]) for s in ahead.scheduled] == [
        ("a", False, (PENDING_TOKEN,)), ("b", False, (PENDING_TOKEN,)), ("c", True, scheduler.get_request("c").prompt_token_ids[:1])]
    assert "late" not in by_id(ahead), "not a member of the running batch"


def test_static_batching_schedule_ahead_leaves_the_next_batch_to_schedule():
    """Every member reaches its length limit with the pending step: the next batch forms after the update."""
    scheduler = static_scheduler([("a", 8, 1), ("b", 8, 1)])
    assert set(by_id(scheduler.schedule())) == {"a", "b"}
    scheduler.add_request(make_request("next", 2))
    assert scheduler.schedule_ahead(0, {"a": 1, "b": 1}) is None
    assert scheduler.update({"a": [5], "b": [6]}) == ("a", "b")
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["next"]


def test_dynamic_batching_admits_while_others_decode():
    scheduler = make_scheduler(max_batch_size=2)
    scheduler.add_request(make_request("a", 3))
    scheduler.update(sample_all(scheduler.schedule(), random.Random(0)))
    scheduler.add_request(make_request("b", 3))
    assert set(by_id(scheduler.schedule())) == {"a", "b"}


def test_admission_blocked_by_empty_queue_full_batch_pages_or_static_batch():
    scheduler = make_scheduler(max_batch_size=2, num_pages=9, page_size=4)  # 8 usable pages
    assert scheduler.admission_blocked(), "an empty queue admits nothing"
    scheduler.add_request(make_request("a", 3))
    assert not scheduler.admission_blocked()
    rng = random.Random(0)
    scheduler.update(sample_all(scheduler.schedule(), rng))
    scheduler.add_request(make_request("b", 3))
    assert not scheduler.admission_blocked(), "a free slot and free pages: b can join"
    scheduler.update(sample_all(scheduler.schedule(), rng))
    scheduler.add_request(make_request("c", 3))
    assert scheduler.admission_blocked(), "both slots are taken"
    scheduler.finish("b", FinishReason.STOP)
    assert not scheduler.admission_blocked()
    scheduler.add_request(make_request("big", 3 * 4 + 1, max_tokens=4))  # behind c in the queue
    scheduler.update(sample_all(scheduler.schedule(), rng))  # c admitted
    assert scheduler.admission_blocked(), "full batch again"
    scheduler.finish("c", FinishReason.STOP)
    a = scheduler.get_request("a")
    # with a decoding, big's first chunk is its 13 tokens (the share 8, widened to the 16-token bucket: 15)
    a.pages.extend(scheduler.allocator.allocate(scheduler.allocator.num_free - 3))  # leave 3 free pages
    assert scheduler.admission_blocked(), "big's first chunk (13 tokens, 4 pages) does not fit 3 free pages"
    scheduler.allocator.free([a.pages.pop()])
    assert not scheduler.admission_blocked(), "4 free pages hold it"
    assert [s.request_id for s in scheduler.schedule().scheduled] == ["a", "big"]  # as schedule() does

    static = make_scheduler(max_batch_size=2, use_dynamic_batching=False)
    static.add_request(make_request("a", 3))
    static.update(sample_all(static.schedule(), rng))
    static.add_request(make_request("b", 3))
    assert static.admission_blocked(), "static batching admits nothing into a decoding batch"


def test_lookahead_allocates_pages_ahead_and_accepts_multiple_tokens():
    scheduler = make_scheduler(page_size=4)
    request = make_request("a", 4, max_tokens=10)
    scheduler.add_request(request)
    (seq,) = scheduler.schedule(num_lookahead_tokens=3).scheduled
    assert seq.num_lookahead_tokens == 3 and len(seq.page_ids) == 2  # positions 0..6
    scheduler.update({"a": [5, 6, 7, 8]})
    assert request.output_token_ids == [5, 6, 7, 8] and request.num_computed_tokens == 7
    (seq,) = scheduler.schedule(num_lookahead_tokens=3).scheduled
    assert seq.token_ids == (8,) and seq.start_position == 7 and len(seq.page_ids) == 3  # up to position 10


def test_lookahead_is_clamped_to_what_the_request_may_still_generate():
    scheduler = make_scheduler(page_size=4)
    request = make_request("a", 4, max_tokens=2)
    scheduler.add_request(request)
    (seq,) = scheduler.schedule(num_lookahead_tokens=5).scheduled
    assert seq.num_lookahead_tokens == 1 and len(seq.page_ids) == 2  # feeds at most positions 0..4
    assert scheduler.update({"a": [1, 2, 3, 4, 5, 6]}) == ("a",)
    assert request.output_token_ids == [1, 2] and request.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.allocator.num_free == scheduler.allocator.num_usable_pages


def test_mid_prefill_chunk_gets_no_lookahead():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", 12))
    (seq,) = scheduler.schedule(num_lookahead_tokens=4).scheduled
    assert not seq.sample and seq.num_lookahead_tokens == 0 and len(seq.page_ids) == 2


@pytest.mark.parametrize("num_prompt, message", [(0, "empty prompt"), (64, "at most 63"), (100, "at most 63")])
def test_add_request_rejects_bad_prompt_lengths(num_prompt, message):
    scheduler = make_scheduler(max_sequence_length=64)
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(make_request("a", num_prompt))
    assert not scheduler.has_unfinished


def test_add_request_rejects_duplicates_and_bad_max_tokens():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already queued"):
        scheduler.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="max_tokens=0"):
        scheduler.add_request(make_request("b", 3, max_tokens=0))


def test_generation_is_capped_at_max_sequence_length():
    scheduler = make_scheduler(max_sequence_length=10)
    request = make_request("a", 7, max_tokens=None)
    scheduler.add_request(request)
    rng, finished = random.Random(0), ()
    while not finished:
        finished = scheduler.update(sample_all(scheduler.schedule(), rng))
    assert finished == ("a",) and request.num_output_tokens == 3 and request.finish_reason is FinishReason.LENGTH


def test_abort_waiting_and_running_requests_frees_everything():
    scheduler = make_scheduler(max_batch_size=1)
    scheduler.add_request(make_request("run", 9))
    scheduler.add_request(make_request("wait", 3))
    out = scheduler.schedule()
    assert scheduler.abort("wait") and scheduler.num_waiting == 0
    assert scheduler.abort("run")  # between schedule() and update(): update skips it
    assert scheduler.update({}) == ()
    assert not scheduler.abort("run") and not scheduler.has_unfinished
    assert scheduler.allocator.num_free == scheduler.allocator.num_usable_pages
    assert out.scheduled[0].request_id == "run"
    with pytest.raises(KeyError, match="unknown or already finished"):
        scheduler.finish("run", FinishReason.STOP)


def test_preemption_recomputes_newest_request_and_outputs_survive():
    # 5 usable pages of 2 tokens; two requests of 4-token prompts grow until pages run out.
    scheduler = make_scheduler(num_pages=6, page_size=2, max_batch_size=2, max_sequence_length=20)
    old, new = make_request("old", 4, max_tokens=6), make_request("new", 4, max_tokens=6)
    scheduler.add_request(old)
    scheduler.add_request(new)
    rng, preempted_seen, finished = random.Random(0), [], []
    for _ in range(60):
        out = scheduler.schedule()
        preempted_seen.extend(out.preempted)
        if "new" in out.preempted:
            assert scheduler.waiting[0] is new and new.num_computed_tokens == 0 and not new.pages
        seq = by_id(out).get("new")
        if seq is not None and seq.is_new and new.num_preemptions:
            assert seq.token_ids == new.all_token_ids[: seq.num_tokens]  # re-prefill includes outputs
        finished.extend(scheduler.update(sample_all(out, rng)))
        if not scheduler.has_unfinished:
            break
    assert preempted_seen and set(preempted_seen) == {"new"}
    assert sorted(finished) == ["new", "old"]
    assert old.num_output_tokens == 6 and new.num_output_tokens == 6 and new.num_preemptions >= 1
    assert scheduler.num_preemptions == len(preempted_seen)


def test_request_larger_than_pool_is_finished_with_error():
    scheduler = make_scheduler(num_pages=4, page_size=2)  # 3 usable pages = 6 tokens
    scheduler.add_request(make_request("huge", 7))
    scheduler.add_request(make_request("ok", 3))
    out = scheduler.schedule()
    assert out.finished == ("huge",) and [s.request_id for s in out.scheduled] == ["ok"]


def test_request_outgrowing_pool_is_finished_with_error():
    scheduler = make_scheduler(num_pages=4, page_size=2, max_sequence_length=20)
    request = make_request("grow", 5, max_tokens=10)
    scheduler.add_request(request)
    rng = random.Random(0)
    for _ in range(10):
        out = scheduler.schedule()
        if out.finished:
            break
        scheduler.update(sample_all(out, rng))
    assert out.finished == ("grow",) and request.finish_reason is FinishReason.ERROR
    assert "needs 4 KV pages" in request.error_message and request.num_tokens == 7  # 6 tokens cached
    assert scheduler.allocator.num_free == 3 and not scheduler.has_unfinished


def test_update_validates_sampled_tokens_before_changing_anything():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = make_request("a", 12)
    scheduler.add_request(request)
    scheduler.schedule()  # chunk of 8, no sampling
    with pytest.raises(RuntimeError, match="before update"):
        scheduler.schedule()
    with pytest.raises(ValueError, match="not scheduled"):
        scheduler.update({"zzz": [1]})
    with pytest.raises(ValueError, match="sample=False"):
        scheduler.update({"a": [1]})
    assert request.num_computed_tokens == 0  # the step is still pending
    scheduler.update({})
    scheduler.add_request(make_request("b", 3))
    out = scheduler.schedule()  # rest of "a" (4, samples) and "b" (3, samples)
    assert [s.sample for s in out.scheduled] == [True, True]
    with pytest.raises(ValueError, match="'b' was scheduled to sample but got no token"):
        scheduler.update({"a": [1]})
    with pytest.raises(ValueError, match="at most 1 \\+ num_lookahead_tokens=0"):
        scheduler.update({"a": [1, 2], "b": [3]})
    assert request.num_output_tokens == 0
    scheduler.update({"a": [1], "b": [3]})
    assert request.output_token_ids == [1] and request.num_computed_tokens == 12


def test_config_validation_messages():
    with pytest.raises(ValueError, match="prefill_ratio=0"):
        SchedulerConfig(4, 16, 4, 64, prefill_ratio=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=2 must be >= max_batch_size=4"):
        SchedulerConfig(4, 2, 4, 64)
    with pytest.raises(ValueError, match="without chunked prefill"):
        SchedulerConfig(4, 16, 4, 64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="page_size"):
        Scheduler(SchedulerConfig(4, 16, 4, 64), PageAllocator(8, 8))
    assert SchedulerConfig(4, 16, 4, 63).max_pages_per_sequence == 16


# ----------------------------------------------------------------------------- property test

PAGE_SIZE, NUM_PAGES, MAX_SEQ = 2, 9, 20  # 8 usable pages = 16 tokens: preemption and errors happen

add_operation = st.tuples(st.just("add"), st.integers(1, 10), st.one_of(st.none(), st.integers(1, 12)))
operations = st.one_of(
    add_operation,
    add_operation,  # listed twice: more requests than pages is the interesting case
    st.tuples(st.just("step"), st.integers(0, 2)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("stop"), st.integers(0, 30)),
)


def check_invariants(scheduler: Scheduler) -> None:
    allocator, config = scheduler.allocator, scheduler.config
    owned = [p for r in scheduler.running for p in r.pages]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    assert len(owned) + allocator.num_free == allocator.num_pages - 1, "a page leaked"
    assert all(allocator.refcount(p) == 1 for p in owned) and 0 not in owned
    slots = [r.slot for r in scheduler.running]
    assert len(set(slots)) == len(slots) and all(0 <= s < config.max_batch_size for s in slots)
    for request in scheduler.running:
        assert request.status is RequestStatus.RUNNING
        assert 0 <= request.num_computed_tokens <= request.num_tokens
        assert len(request.pages) >= allocator.pages_needed(request.num_computed_tokens)
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert not request.pages and request.slot is None and request.num_computed_tokens == 0


def check_output(scheduler: Scheduler, output: SchedulerOutput) -> None:
    config = scheduler.config
    assert output.num_scheduled_tokens <= config.max_num_batched_tokens
    if output.num_decode_tokens:  # prefill within its share, widened only to the bucket the share pads to
        bucket = BucketLadder(config.max_batch_size, config.max_num_batched_tokens).token_bucket
        share_bucket = bucket(min(config.max_num_batched_tokens, output.num_decode_tokens + config.prefill_token_cap))
        assert output.num_scheduled_tokens <= share_bucket
    assert len({s.slot for s in output.scheduled}) == len(output.scheduled) <= config.max_batch_size
    assert not set(output.preempted) & set(by_id(output))
    for seq in output.scheduled:
        request = scheduler.get_request(seq.request_id)
        if request is None:
            continue  # planned ahead, then stopped or aborted: its entry is skipped
        known = request.all_token_ids[seq.start_position : seq.end_position]  # PENDING_TOKEN: sampled since
        assert all(t == k or t == PENDING_TOKEN for t, k in zip(seq.token_ids, known, strict=True))
        assert seq.start_position == request.num_computed_tokens
        assert len(seq.page_ids) * PAGE_SIZE >= seq.end_position + seq.num_lookahead_tokens
        assert seq.sample == (seq.end_position == request.num_tokens)


def expected_total(request: Request) -> int:
    max_tokens = request.sampling_params.max_tokens
    return MAX_SEQ if max_tokens is None else min(request.num_prompt_tokens + max_tokens, MAX_SEQ)


def run_step(scheduler: Scheduler, rng: random.Random, lookahead: int, stats: dict) -> None:
    """One step; with ``stats["ahead"]`` as the async engine runs it: the step after it is planned by
    ``schedule_ahead`` before its tokens are applied, and a sequence may stop before its last token."""
    batch = stats.get("batch")
    output = stats.pop("pending", None)
    if output is None:  # (a plan ahead never forms a static batch)
        if batch is not None and not scheduler.running and not any(scheduler.get_request(r) for r in batch):
            batch.clear()  # static batching: the last batch is done, the requests waiting now form the next
            batch.update(r.request_id for r in scheduler.waiting[: scheduler.config.max_batch_size])
        output = scheduler.schedule(num_lookahead_tokens=scheduler.next_lookahead(lookahead) if "ahead" in stats else lookahead)
    check_output(scheduler, output)
    if batch is not None:
        assert {s.request_id for s in output.scheduled if s.is_new} <= batch, "admitted a non-member"
        assert {r.request_id for r in scheduler.running} <= batch
    stats["preemptions"] += len(output.preempted)
    tokens = {i: t for i, t in sample_all(output, rng, extra=output.num_lookahead_tokens).items() if scheduler.get_request(i)}
    if "ahead" not in stats or output.is_empty:
        scheduler.update(tokens)
        return
    limits = {i: scheduler._max_total_tokens(scheduler.get_request(i)) for i in tokens}
    ends = {e.request_id: e.end_position for e in output.scheduled}
    tokens = {i: t[: limits[i] - ends[i]] for i, t in tokens.items()}  # as the runner's max_new cuts them
    ahead = scheduler.schedule_ahead(lookahead, {i: len(t) for i, t in tokens.items()})
    stats["ahead"] += ahead is not None
    stopping = {i for i in tokens if rng.random() < 0.1}
    scheduler.update({i: t[: rng.randrange(1, len(t) + 1)] if i in stopping else t for i, t in tokens.items()})
    for request_id in stopping:
        if scheduler.get_request(request_id) is not None:
            scheduler.finish(request_id, FinishReason.STOP)
            stats["stopped"].add(request_id)
    if ahead is not None:
        stats["pending"] = ahead


def run_operations(ops, seed: int, max_batch_size: int, stats: dict, use_dynamic_batching: bool = True,
                   ahead: bool = False) -> None:
    scheduler = make_scheduler(
        num_pages=NUM_PAGES, page_size=PAGE_SIZE, max_batch_size=max_batch_size,
        max_num_batched_tokens=8, max_sequence_length=MAX_SEQ, prefill_ratio=0.5,
        use_dynamic_batching=use_dynamic_batching,
    )
    if not use_dynamic_batching:
        stats["batch"] = set()  # the current static batch's members, tracked from the outside
    if ahead:
        stats.update(ahead=0, stopped=set())  # steps planned ahead, requests that stopped early
    rng, requests, cut_short = random.Random(seed), [], set()
    for op in ops:
        if op[0] == "add":
            requests.append(make_request(f"r{len(requests)}", op[1], op[2], seed=seed))
            scheduler.add_request(requests[-1])
        elif op[0] == "step":
            run_step(scheduler, rng, op[1], stats)
        elif requests:
            request = requests[op[1] % len(requests)]
            if scheduler.get_request(request.request_id) is not None:
                cut_short.add(request.request_id)
                if op[0] == "abort":
                    scheduler.abort(request.request_id)
                else:
                    scheduler.finish(request.request_id, FinishReason.STOP)
        check_invariants(scheduler)
    for _ in range(2000):  # drive to completion
        if not scheduler.has_unfinished:
            if "pending" in stats:  # a plan ahead for requests that finished since: every entry skipped
                scheduler.update({})
                stats.pop("pending")
            break
        run_step(scheduler, rng, rng.randrange(3), stats)
        check_invariants(scheduler)
    assert not scheduler.has_unfinished, "requests never finished"
    assert scheduler.allocator.num_free == NUM_PAGES - 1
    for request in requests:
        assert request.is_finished
        if request.request_id in cut_short | stats.get("stopped", set()):
            continue
        # Cached tokens at the end: all but the last sampled one.
        fits = scheduler.allocator.pages_needed(expected_total(request) - 1) <= NUM_PAGES - 1
        if fits:
            assert request.finish_reason is FinishReason.LENGTH, request.error_message
            assert request.num_tokens == expected_total(request)
        else:
            assert request.finish_reason is FinishReason.ERROR


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(ops=st.lists(operations, min_size=10, max_size=50), seed=st.integers(0, 2**16), max_batch_size=st.integers(1, 4))
def test_random_operations_keep_pages_consistent_and_finish_every_request(ops, seed, max_batch_size):
    stats = {"preemptions": 0}
    run_operations(ops, seed, max_batch_size, stats)
    hypothesis.event("preempted" if stats["preemptions"] else "not preempted")


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(ops=st.lists(operations, min_size=10, max_size=50), seed=st.integers(0, 2**16), max_batch_size=st.integers(1, 4))
def test_random_operations_static_batching_admits_only_members_and_finishes_every_request(ops, seed, max_batch_size):
    stats = {"preemptions": 0}
    run_operations(ops, seed, max_batch_size, stats, use_dynamic_batching=False)
    hypothesis.event("preempted" if stats["preemptions"] else "not preempted")


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(ops=st.lists(operations, min_size=10, max_size=50), seed=st.integers(0, 2**16), max_batch_size=st.integers(1, 4),
                  dynamic=st.booleans())
def test_random_operations_with_steps_planned_ahead(ops, seed, max_batch_size, dynamic):
    """The same with async scheduling: plans made before their predecessor's tokens, sequences stopping
    early, aborts and stops while a plan ahead holds them -- pages and slots stay consistent and every
    request finishes with its expected length."""
    stats = {"preemptions": 0}
    run_operations(ops, seed, max_batch_size, stats, use_dynamic_batching=dynamic, ahead=True)
    hypothesis.event("planned ahead" if stats["ahead"] else "none planned ahead")


def test_property_driver_exercises_preemption():
    """A fixed workload through the same driver: preemption must actually happen."""
    ops = [("add", 6, 8), ("add", 5, None), ("add", 7, 9), ("step", 0), ("step", 1), ("add", 3, 12)]
    stats = {"preemptions": 0}
    run_operations(ops, seed=1, max_batch_size=4, stats=stats)
    assert stats["preemptions"] > 0


def test_token_ids_between_is_a_slice_of_the_whole_history():
    from autoglm_jax.engine.request import Request

    request = Request("r", tuple(range(100, 107)), None, 0.0)
    request.output_token_ids.extend([7, 8, 9])
    history = request.all_token_ids
    for start in range(len(history) + 1):
        for end in range(start, len(history) + 1):
            assert request.token_ids_between(start, end) == history[start:end]
