"""The engine step log (``engine.step_log``, ``EngineCore.enable_step_log``): one row per engine call with
the right kind and token counts for a scripted workload (one step at a time and with async scheduling),
a summary whose kinds' walls add up to the span, the ring, and nothing recorded or wrapped when off."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_jax.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from autoglm_jax.engine.runner import LaunchRecord
from autoglm_jax.engine.step_log import (StepLog, StepRecord, format_launch_summary, format_step_summary,
                                         summarize_launches, summarize_steps)
from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import random_prompt

PROMPT_LENGTHS = (10, 20, 30)  # 60 prompt tokens over the tiny engine's 32-token budget: 2+ mixed calls
MAX_TOKENS = 9
DECODE_STEPS = 4  # the tiny engine's decode_steps_per_call


def row(t_begin, t_tokens, t_end, prefill, decode_rows, steps, generated, blocked, ahead=False) -> StepRecord:
    return StepRecord(t_begin, t_tokens, t_end, prefill > 0, prefill, decode_rows, steps, generated, blocked,
                      0.5 * (t_end - t_begin - blocked), ahead)


def test_summary_attributes_each_gap_to_the_later_call():
    rows = [row(0.00, 0.10, 0.12, 100, 0, 1, 2, 0.05),
            row(0.13, 0.30, 0.31, 1500, 2, 1, 3, 0.10),
            row(0.31, 0.50, 0.52, 0, 3, 4, 12, 0.15, ahead=True),
            row(0.52, 0.60, 0.61, 0, 3, 2, 6, 0.05, ahead=True)]
    s = summarize_steps(rows, origin=0.0)
    mixed, decode = s["kinds"]["mixed"], s["kinds"]["decode"]
    assert s["calls"] == 4 and s["span_s"] == pytest.approx(0.60) and s["generated_tokens"] == 23
    assert mixed["wall_s"] == pytest.approx(0.30) and decode["wall_s"] == pytest.approx(0.30)
    assert mixed["wall_fraction"] + decode["wall_fraction"] == pytest.approx(1.0)
    assert mixed["wall_ms"]["p50"] == pytest.approx(150.0) and mixed["wall_ms"]["max"] == pytest.approx(200.0)
    assert decode["ms_per_decode_step"] == pytest.approx(300.0 / 6) and decode["tokens_per_s"] == pytest.approx(60.0)
    assert mixed["ms_per_decode_step"] == pytest.approx(150.0) and mixed["prefill_tokens"] == 1600
    assert decode["decode_rows_mean"] == 3.0 and mixed["decode_rows_mean"] == 1.0
    assert mixed["ahead_fraction"] == 0.0 and decode["ahead_fraction"] == 1.0
    assert decode["host_ms"]["mean"] == pytest.approx(1e3 * (0.21 - 0.15 + 0.09 - 0.05) / 2)
    assert decode["blocked_ms"]["mean"] == pytest.approx(100.0)
    assert mixed["host_cpu_ms_mean"] == pytest.approx(0.5 * 1e3 * (0.07 + 0.08) / 2)
    assert s["prefill_tokens_per_mixed_call"] == {"1-128": 1, "129-256": 0, "257-512": 0, "513-1024": 0,
                                                  "1025-2048": 1, ">2048": 0}
    assert s["loop_gap_s"] == pytest.approx(0.01) and s["host_s"] == pytest.approx(0.07 + 0.08 + 0.06 + 0.04)
    assert summarize_steps(rows)["span_s"] == pytest.approx(0.60)  # origin = the first call's t_begin
    text = format_step_summary(s)
    assert "| mixed | 2 | 0.30 | 50.0% |" in text and "| decode | 2 | 0.30 | 50.0% |" in text
    assert "1025-2048: 1" in text
    with pytest.raises(ValueError, match="buckets"):
        summarize_steps(rows, buckets=(256, 128))


def _output(prefill: int, decode_rows: int) -> SchedulerOutput:
    decodes = [ScheduledSequence(f"d{i}", i, (5,), 10, (1,), True, False, True) for i in range(decode_rows)]
    chunk = [ScheduledSequence("p", decode_rows, (7,) * prefill, 0, (2,), True, True, False)] if prefill else []
    return SchedulerOutput(tuple(decodes + chunk))


def test_the_ring_keeps_the_last_calls_and_their_walls_still_add_up():
    log = StepLog(capacity=2)
    for prefill, rows in ((12, 0), (0, 2), (0, 2), (5, 1)):
        log.begin(ahead=False)
        sampled = {f"d{i}": [1, 2, 3] for i in range(rows)} | ({"p": [4]} if prefill else {})
        log.record(_output(prefill, rows), sampled, sum(map(len, sampled.values())))
        log.end()
    kept = list(log.rows)
    assert [(r.mixed, r.prefill_tokens, r.decode_rows, r.decode_steps, r.generated) for r in kept] == [
        (False, 0, 2, 3, 6), (True, 5, 1, 1, 4)]
    s = log.summary()
    assert s["span_s"] == pytest.approx(kept[-1].t_tokens - log.origin) and log.origin < kept[0].t_begin
    assert sum(k["wall_s"] for k in s["kinds"].values()) == pytest.approx(s["span_s"])
    log.end()  # an end without a begin (or a record without one) adds nothing
    log.record(_output(3, 0), {"p": [1]}, 1)
    assert len(log.rows) == 2
    with pytest.raises(ValueError, match="capacity"):
        StepLog(capacity=0)


def settle(core) -> None:
    """No request and no call in flight (an earlier test's generate may leave a call planned ahead)."""
    for request_id in list(core.requests):
        core.abort(request_id)
    while core._in_flight is not None:
        core.step()


@pytest.fixture
def core(tiny_llm, monkeypatch):
    core = tiny_llm.engine
    settle(core)
    monkeypatch.setattr(core, "async_scheduling", core.async_scheduling)
    yield core
    core.disable_step_log()
    settle(core)


def run_scripted(core, logs: list | None = None) -> list[StepRecord]:
    """Three requests queued together (prompts of PROMPT_LENGTHS tokens, MAX_TOKENS each), stepped to the end
    (the StepLog is appended to ``logs`` when given)."""
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, ignore_eos=True)
    log = core.enable_step_log()
    for length in PROMPT_LENGTHS:
        core.add_request(random_prompt(rng, length), params)
    while core.has_unfinished_requests() or core._in_flight is not None:
        core.step()
    assert core.disable_step_log() is log and core.step_log is None
    if logs is not None:
        logs.append(log)
    return list(log.rows)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_rows_of_a_scripted_workload(core, async_scheduling):
    runner = core.runner
    assert core.step_log is None and "_fetch" not in vars(runner)  # off by default: no log, nothing wrapped
    core.async_scheduling = async_scheduling
    rows = run_scripted(core)
    assert "_fetch" not in vars(runner)  # the runner's own _fetch again
    kinds = [r.mixed for r in rows]
    first_decode = kinds.index(False)
    assert first_decode >= 2 and not any(kinds[first_decode:]), kinds  # the prompts first, then decode calls
    mixed, decode = rows[:first_decode], rows[first_decode:]
    assert sum(r.prefill_tokens for r in mixed) == sum(PROMPT_LENGTHS)
    assert all(r.decode_steps == 1 for r in mixed) and mixed[0].decode_rows == 0
    # every prompt completes once in a mixed call (its first token), and each decode row there samples one
    assert sum(r.generated for r in mixed) == sum(r.decode_rows for r in mixed) + len(PROMPT_LENGTHS)
    assert all(r.prefill_tokens == 0 and 1 <= r.decode_rows <= 3 and r.decode_steps <= DECODE_STEPS
               and r.generated <= r.decode_rows * r.decode_steps for r in decode)
    assert any(r.decode_rows == 3 and r.decode_steps == DECODE_STEPS and r.generated == 12 for r in decode)
    assert sum(r.generated for r in rows) == MAX_TOKENS * len(PROMPT_LENGTHS)
    assert all(r.t_begin <= r.t_tokens <= r.t_end and r.blocked_s >= 0 for r in rows)
    assert all(a.t_end <= b.t_begin for a, b in zip(rows, rows[1:]))
    assert not mixed[0].ahead and any(r.ahead for r in decode) == async_scheduling
    s = summarize_steps(rows)
    assert s["calls"] == len(rows) and s["kinds"]["mixed"]["calls"] == len(mixed)
    assert s["kinds"]["mixed"]["wall_s"] + s["kinds"]["decode"]["wall_s"] == pytest.approx(s["span_s"])
    assert s["span_s"] == pytest.approx(rows[-1].t_tokens - rows[0].t_begin)
    assert s["generated_tokens"] == MAX_TOKENS * len(PROMPT_LENGTHS)


def test_the_same_mixed_calls_with_and_without_async_scheduling(core):
    def mixed(async_scheduling):
        core.async_scheduling = async_scheduling
        return [(r.prefill_tokens, r.decode_rows, r.generated) for r in run_scripted(core) if r.mixed]

    assert mixed(False) == mixed(True)


def test_launch_records_of_a_scripted_workload(core):
    """With async scheduling every engine call is one program call on the runner's launch thread (the
    ladder is compiled): one LaunchRecord each, in the calls' order, with ordered timestamps; the runner
    stops logging when the step log is detached."""
    runner, logs = core.runner, []
    assert runner.launch_log is None
    core.async_scheduling = True
    rows = run_scripted(core, logs)
    launches = list(logs[0].launches)
    assert runner.launch_log is None
    assert [r.kind == "mixed" for r in launches] == [r.mixed for r in rows]
    assert all(r.t_submit <= r.t_enter <= r.t_call <= r.t_return for r in launches)
    assert all(a.t_return <= b.t_enter for a, b in zip(launches, launches[1:]))  # one launch thread, in order
    summary = logs[0].summary()["launches"]
    assert summary["calls"] == len(rows) and summary["call_ms"]["decode"] is not None
    assert format_launch_summary(summary).startswith(f"launch thread: {len(rows)} calls")


def test_summarize_launches_splits_queued_calls_from_late_ones():
    records = [LaunchRecord("mixed", 0.000, 0.000, 0.001, 0.050),
               LaunchRecord("decode", 0.020, 0.051, 0.052, 0.150),   # queued: program called 2 ms after the return
               LaunchRecord("decode", 0.160, 0.160, 0.161, 0.260),   # handed over 10 ms after the return
               LaunchRecord("mixed", 0.200, 0.262, 0.266, 0.300)]    # queued: 6 ms
    s = summarize_launches(records)
    assert s["calls"] == 4 and s["queued_fraction"] == pytest.approx(2 / 3)
    assert s["handoff_ms"]["mean"] == pytest.approx(4.0) and s["handoff_ms"]["max"] == pytest.approx(6.0)
    assert s["late_ms"]["mean"] == pytest.approx(10.0)
    assert s["arguments_ms"]["max"] == pytest.approx(4.0)
    assert s["call_ms"]["decode"]["mean"] == pytest.approx(98.5) and s["call_ms"]["mixed"]["mean"] == pytest.approx(41.5)
    assert summarize_launches([])["queued_fraction"] is None
