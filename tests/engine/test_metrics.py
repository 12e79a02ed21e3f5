"""Request and engine metrics from timestamps driven through a real scheduler."""

import dataclasses

import pytest

from autoglm_jax.engine.metrics import EngineMetrics, RequestMetrics
from autoglm_jax.engine.page_allocator import PageAllocator
from autoglm_jax.engine.request import FinishReason, Request
from autoglm_jax.engine.scheduler import Scheduler, SchedulerConfig


@dataclasses.dataclass(frozen=True)
class Params:
    max_tokens: int | None = 3
    n: int = 1


class ManualClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_request_metrics_from_scheduled_request():
    clock = ManualClock(10.0)
    scheduler = Scheduler(SchedulerConfig(2, 16, 4, 64), PageAllocator(8, 4), clock=clock)
    request = Request("a", [11, 12, 13, 14, 15], Params(max_tokens=3), arrival_time=9.5)
    scheduler.add_request(request)
    for step_end in (10.25, 10.5, 11.0):  # prefill + 2 decodes
        output = scheduler.schedule()
        clock.now = step_end
        finished = scheduler.update({s.request_id: [7] for s in output.scheduled if s.sample})
    assert finished == ("a",)
    metrics = RequestMetrics.from_request(request)
    assert metrics.queue_time_s == pytest.approx(0.5)
    assert metrics.ttft_s == pytest.approx(0.75)
    assert metrics.tpot_s == pytest.approx(0.375)  # (11.0 - 10.25) / 2
    assert metrics.e2e_latency_s == pytest.approx(1.5)
    assert (metrics.num_prompt_tokens, metrics.num_output_tokens, metrics.finish_reason) == (5, 3, "length")


def test_aborted_before_scheduling_has_no_latencies():
    scheduler = Scheduler(SchedulerConfig(2, 16, 4, 64), PageAllocator(8, 4), clock=ManualClock(3.0))
    request = Request("a", [1, 2], Params(), arrival_time=1.0)
    scheduler.add_request(request)
    scheduler.abort("a")
    metrics = RequestMetrics.from_request(request)
    assert (metrics.queue_time_s, metrics.ttft_s, metrics.tpot_s) == (None, None, None)
    assert metrics.e2e_latency_s == pytest.approx(2.0) and metrics.finish_reason == "abort"


def test_unfinished_request_is_rejected():
    with pytest.raises(ValueError, match="not finished"):
        RequestMetrics.from_request(Request("a", [1], Params(), arrival_time=0.0))


def finished_request(request_id, reason, arrival, first_token, last_token, num_outputs):
    request = Request(request_id, [1, 2, 3], Params(), arrival_time=arrival)
    request.output_token_ids = list(range(num_outputs))
    request.first_scheduled_time = arrival + 0.1
    request.first_token_time, request.last_token_time = first_token, last_token
    request.finished_time = last_token
    request.status, request.finish_reason = reason.status, reason
    return request


def test_engine_snapshot_counts_rates_and_summaries():
    metrics = EngineMetrics(start_time=0.0, window_s=10.0)
    for _ in range(3):
        metrics.record_arrival()
    metrics.record_step(1.0, num_prompt_tokens=30, num_generated_tokens=2, num_preemptions=0,
                        num_running=2, num_waiting=1, kv_cache_utilization=0.25)
    metrics.record_step(4.0, num_prompt_tokens=0, num_generated_tokens=6, num_preemptions=1,
                        num_running=1, num_waiting=1, kv_cache_utilization=0.5)
    metrics.record_finished(finished_request("a", FinishReason.LENGTH, 0.0, 1.0, 3.0, 5))
    metrics.record_finished(finished_request("b", FinishReason.ABORT, 0.5, 2.0, 2.0, 1))
    snapshot = metrics.snapshot(now=4.0)
    assert snapshot["num_requests"] == 3 and snapshot["num_finished"] == 2
    assert snapshot["num_finished_length"] == 1 and snapshot["num_aborted"] == 1 and snapshot["num_errors"] == 0
    assert (snapshot["num_running"], snapshot["num_waiting"], snapshot["kv_cache_utilization"]) == (1, 1, 0.5)
    assert snapshot["num_preemptions"] == 1 and snapshot["num_steps"] == 2
    assert snapshot["prompt_tokens_per_s"] == pytest.approx(30 / 4.0)  # engine up for 4 s < window
    assert snapshot["generation_tokens_per_s"] == pytest.approx(8 / 4.0)
    assert snapshot["ttft_s"]["mean"] == pytest.approx(1.25) and snapshot["ttft_s"]["max"] == pytest.approx(1.5)
    assert snapshot["tpot_s"]["p50"] == pytest.approx(0.5)  # only "a" has > 1 output token
    # 12 s later the first step left the 10 s window; the second is still inside.
    later = metrics.snapshot(now=13.5)
    assert later["prompt_tokens_per_s"] == 0.0
    assert later["generation_tokens_per_s"] == pytest.approx(6 / 10.0)
    assert later["total_prompt_tokens"] == 30


def test_empty_engine_snapshot():
    snapshot = EngineMetrics(start_time=5.0).snapshot(now=5.0)
    assert snapshot["generation_tokens_per_s"] == 0.0 and snapshot["ttft_s"] is None


def test_engine_metrics_rejects_bad_values():
    metrics = EngineMetrics(start_time=0.0)
    with pytest.raises(ValueError, match="kv_cache_utilization=1.5"):
        metrics.record_step(1.0, num_prompt_tokens=0, num_generated_tokens=0, num_preemptions=0,
                            num_running=0, num_waiting=0, kv_cache_utilization=1.5)
    with pytest.raises(ValueError, match="num_generated_tokens=-1"):
        metrics.record_step(1.0, num_prompt_tokens=0, num_generated_tokens=-1, num_preemptions=0,
                            num_running=0, num_waiting=0, kv_cache_utilization=0.0)
    with pytest.raises(ValueError, match="window_s=0"):
        EngineMetrics(start_time=0.0, window_s=0)
