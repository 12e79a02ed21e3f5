"""Serving metrics as plain Python objects.

Owns: per-request latency figures computed from a finished ``Request``'s timestamps, and engine-wide
counters, gauges and windowed throughput. It does not own the clock (callers pass ``now``), export
formats (a server may turn ``snapshot()`` into Prometheus text), or when things are recorded (the
engine loop calls ``record_*``).

Per request (seconds, engine clock): queue time = first scheduled - arrival; TTFT = first token -
arrival; TPOT = (last token - first token) / (output tokens - 1); end-to-end = finished - arrival.
A figure whose events did not happen (an aborted request never scheduled, a single output token for
TPOT) is None.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from autoglm_jax.engine.request import FinishReason, Request


def _interval(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    queue_time_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    e2e_latency_s: float | None
    num_preemptions: int
    finish_reason: str | None  # FinishReason value ("stop", "length", "abort", "error")

    @classmethod
    def from_request(cls, request: Request) -> "RequestMetrics":
        if not request.is_finished:
            raise ValueError(f"request {request.request_id!r} is not finished (status={request.status.name})")
        tpot = None
        if request.num_output_tokens > 1:
            tpot = _interval(request.first_token_time, request.last_token_time) / (request.num_output_tokens - 1)
        return cls(
            request_id=request.request_id,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            queue_time_s=_interval(request.arrival_time, request.first_scheduled_time),
            ttft_s=_interval(request.arrival_time, request.first_token_time),
            tpot_s=tpot,
            e2e_latency_s=_interval(request.arrival_time, request.finished_time),
            num_preemptions=request.num_preemptions,
            finish_reason=None if request.finish_reason is None else request.finish_reason.value,
        )


def value_summary(values: list[float]) -> dict[str, float] | None:
    """mean / p50 / p90 / p99 / max of the values, or None if there are none."""
    if not values:
        return None
    array = np.asarray(values, np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"mean": float(array.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(array.max())}


class EngineMetrics:
    """Counters, gauges and throughput of one engine.

    Throughput is tokens recorded by steps in ``(now - window_s, now]`` divided by
    ``min(window_s, now - start_time)``; per-request latency summaries cover the last
    ``max_recent_requests`` finished requests.
    """

    def __init__(self, start_time: float, window_s: float = 10.0, max_recent_requests: int = 1000):
        if window_s <= 0:
            raise ValueError(f"window_s={window_s} must be > 0")
        if max_recent_requests < 1:
            raise ValueError(f"max_recent_requests={max_recent_requests} must be >= 1")
        self.start_time = start_time
        self.window_s = window_s
        self._steps: collections.deque[tuple[float, int, int]] = collections.deque()  # (t, prompt, generated)
        self._recent: collections.deque[RequestMetrics] = collections.deque(maxlen=max_recent_requests)
        self._finish_counts = collections.Counter()
        self.num_requests = 0
        self.num_steps = 0
        self.num_preemptions = 0
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_utilization = 0.0

    def record_arrival(self) -> None:
        self.num_requests += 1

    def record_step(
        self,
        now: float,
        *,
        num_prompt_tokens: int,
        num_generated_tokens: int,
        num_preemptions: int,
        num_running: int,
        num_waiting: int,
        kv_cache_utilization: float,
    ) -> None:
        """One engine step: tokens prefilled (re-prefills included) and sampled, preemptions it
        caused, and the gauges after it."""
        for name, value in (("num_prompt_tokens", num_prompt_tokens), ("num_generated_tokens", num_generated_tokens),
                            ("num_preemptions", num_preemptions), ("num_running", num_running),
                            ("num_waiting", num_waiting)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if not 0.0 <= kv_cache_utilization <= 1.0:
            raise ValueError(f"kv_cache_utilization={kv_cache_utilization} must be in [0, 1]")
        self.num_steps += 1
        self.num_preemptions += num_preemptions
        self.total_prompt_tokens += num_prompt_tokens
        self.total_generated_tokens += num_generated_tokens
        self.num_running, self.num_waiting = num_running, num_waiting
        self.kv_cache_utilization = kv_cache_utilization
        self._steps.append((now, num_prompt_tokens, num_generated_tokens))

    def record_finished(self, request: Request) -> RequestMetrics:
        metrics = RequestMetrics.from_request(request)
        self._finish_counts[request.finish_reason] += 1
        self._recent.append(metrics)
        return metrics

    def throughput(self, now: float) -> tuple[float, float]:
        """(prompt tokens/s, generated tokens/s) over the window ending at ``now``."""
        while self._steps and self._steps[0][0] <= now - self.window_s:
            self._steps.popleft()
        span = min(self.window_s, now - self.start_time)
        if span <= 0:
            return 0.0, 0.0
        prompt = sum(s[1] for s in self._steps if s[0] <= now)
        generated = sum(s[2] for s in self._steps if s[0] <= now)
        return prompt / span, generated / span

    def snapshot(self, now: float) -> dict:
        prompt_rate, generation_rate = self.throughput(now)
        counts = self._finish_counts
        recent = list(self._recent)
        return {
            "num_requests": self.num_requests,
            "num_finished": sum(counts.values()),
            "num_finished_stop": counts[FinishReason.STOP],
            "num_finished_length": counts[FinishReason.LENGTH],
            "num_aborted": counts[FinishReason.ABORT],
            "num_errors": counts[FinishReason.ERROR],
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_utilization": self.kv_cache_utilization,
            "num_preemptions": self.num_preemptions,
            "num_steps": self.num_steps,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_generated_tokens": self.total_generated_tokens,
            "prompt_tokens_per_s": prompt_rate,
            "generation_tokens_per_s": generation_rate,
            "queue_time_s": value_summary([m.queue_time_s for m in recent if m.queue_time_s is not None]),
            "ttft_s": value_summary([m.ttft_s for m in recent if m.ttft_s is not None]),
            "tpot_s": value_summary([m.tpot_s for m in recent if m.tpot_s is not None]),
            "e2e_latency_s": value_summary([m.e2e_latency_s for m in recent if m.e2e_latency_s is not None]),
        }
