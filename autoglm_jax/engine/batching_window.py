"""Adaptive batching window: how long an idle engine waits for more requests before stepping.

Owns: the decision "step now or wait up to W seconds", from measured request inter-arrival times
and step latencies (both exponentially weighted moving averages). It does not own the clock (every
method takes timestamps, so it is deterministic and testable), sleeping (the engine waits on its
queue with this timeout and re-asks after each arrival), or admission (``engine.scheduler``).

Policy of ``wait_time`` (first rule that applies):
  1. disabled, nothing waiting, or waiting + running already fill ``max_batch_size``  -> 0
  2. sequences are running (busy: waiting would stall their decodes)                -> min_wait
  3. no arrival-rate estimate yet (fewer than two arrivals)                           -> min_wait
  4. the window bound B = min(max_wait, EWMA step latency) (waiting longer than one step never
     beats stepping now and admitting the latecomer next step). If the expected inter-arrival gap
     exceeds B (traffic too sparse for another request to come in time)               -> min_wait
  5. otherwise wait until the next expected arrival (last arrival + gap), at least min_wait and
     never past B after the first request that arrived since the last step           -> that
So the wait tracks the arrival gap: short when requests come densely, longer when they are sparser,
and zero-ish once they are too sparse to be worth waiting for.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BatchingWindowConfig:
    enabled: bool = True
    min_wait_ms: float = 0.0
    max_wait_ms: float = 10.0
    ewma_alpha: float = 0.25  # weight of the newest sample in both moving averages

    def __post_init__(self):
        if not 0.0 <= self.min_wait_ms <= self.max_wait_ms:
            raise ValueError(
                f"BatchingWindowConfig needs 0 <= min_wait_ms <= max_wait_ms, got "
                f"min_wait_ms={self.min_wait_ms}, max_wait_ms={self.max_wait_ms}"
            )
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError(f"BatchingWindowConfig.ewma_alpha={self.ewma_alpha} must be in (0, 1]")


def _ewma(average: float | None, sample: float, alpha: float) -> float:
    return sample if average is None else alpha * sample + (1.0 - alpha) * average


class BatchingWindow:
    def __init__(self, config: BatchingWindowConfig = BatchingWindowConfig()):
        self.config = config
        self._last_arrival: float | None = None
        self._inter_arrival_s: float | None = None
        self._step_latency_s: float | None = None
        self._window_open_time: float | None = None  # first arrival since the last step

    @property
    def inter_arrival_s(self) -> float | None:
        """EWMA of the gap between consecutive arrivals (None before two arrivals)."""
        return self._inter_arrival_s

    @property
    def step_latency_s(self) -> float | None:
        """EWMA latency of non-empty steps (None before the first)."""
        return self._step_latency_s

    def record_arrival(self, t: float) -> None:
        """A request arrived at time ``t`` (seconds, non-decreasing)."""
        if self._last_arrival is not None:
            gap = t - self._last_arrival
            if gap < 0:
                raise ValueError(f"arrival time {t} is before the previous arrival {self._last_arrival}")
            self._inter_arrival_s = _ewma(self._inter_arrival_s, gap, self.config.ewma_alpha)
        self._last_arrival = t
        if self._window_open_time is None:
            self._window_open_time = t

    def record_step(self, latency_s: float, batch_size: int) -> None:
        """A step of ``batch_size`` sequences took ``latency_s``; it closes the current window.
        Empty steps (batch_size 0) do not move the latency estimate."""
        if latency_s < 0 or batch_size < 0:
            raise ValueError(f"latency_s={latency_s} and batch_size={batch_size} must be >= 0")
        if batch_size > 0:
            self._step_latency_s = _ewma(self._step_latency_s, latency_s, self.config.ewma_alpha)
        self._window_open_time = None

    def wait_time(self, now: float, num_waiting: int, num_running: int, max_batch_size: int) -> float:
        """Seconds to wait for more arrivals before the next step (see the module docstring)."""
        config = self.config
        if not config.enabled or num_waiting == 0 or num_waiting + num_running >= max_batch_size:
            return 0.0
        min_wait = config.min_wait_ms / 1000.0
        if num_running > 0 or self._inter_arrival_s is None:
            return min_wait
        bound = config.max_wait_ms / 1000.0
        if self._step_latency_s is not None:
            bound = max(min_wait, min(bound, self._step_latency_s))
        if self._inter_arrival_s > bound:
            return min_wait
        opened = self._window_open_time if self._window_open_time is not None else now
        deadline = opened + bound
        if now >= deadline:
            return 0.0
        expected_next = self._last_arrival + self._inter_arrival_s
        return min(max(expected_next - now, min_wait), deadline - now)
