"""The serving benchmarks' summary of per-request timings — one definition for autoglm-jax and transformers.

Owns: turning client-side timestamps into the reported numbers: output tokens/s and requests/s over
the run (first submission -> last token), and TTFT / TPOT / ITL / end-to-end mean, p50, p90, p99 in ms
(``e2e_mean_ms`` is the "mean latency" of the tables). Definitions as in ``tools.serving_benchmark``:
TTFT = submit -> first output token; TPOT = (last token - first token) / (tokens - 1); ITL = the gap
between successive tokens (a streamed update that brings k tokens counts its gap / k, k times).

A timing is anything with ``submitted``, ``first``, ``last`` (seconds, one clock), ``tokens`` and
``gaps`` (per-token inter-token latencies): ``tools.serving_benchmark._Timing`` (streamed from the
engine) or ``RequestTiming`` (from per-token timestamps, e.g. transformers' ``record_timestamps``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from autoglm_jax.tools.serving_benchmark import _percentiles


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    submitted: float
    first: float
    last: float
    tokens: int
    gaps: tuple[float, ...]


def timing_from_token_times(submitted: float, token_times: Sequence[float]) -> RequestTiming:
    """A request's timing from the time it was submitted and the time each output token appeared."""
    if not token_times:
        raise ValueError("a request produced no output tokens (no timestamps to time it by)")
    times = np.asarray(token_times, dtype=np.float64)
    if np.any(np.diff(times) < 0) or times[0] < submitted:
        raise ValueError("token timestamps must be non-decreasing and not before the submission")
    return RequestTiming(submitted, float(times[0]), float(times[-1]), len(times), tuple(np.diff(times).tolist()))


def summarize(timings: Sequence, start: float | None = None) -> dict[str, Any]:
    """The metrics dict of a finished run. ``start``: when the run began (default: the first submission)."""
    if not timings:
        raise ValueError("no requests to summarize")
    start = min(t.submitted for t in timings) if start is None else start
    duration = max(t.last for t in timings) - start
    if duration <= 0:
        raise ValueError(f"run duration {duration} s must be > 0")
    output_tokens = sum(t.tokens for t in timings)
    e2e = [t.last - t.submitted for t in timings]
    return {
        "num_requests": len(timings), "duration_s": duration, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration, "requests_per_s": len(timings) / duration,
        **_percentiles("ttft", [t.first - t.submitted for t in timings]),
        **_percentiles("tpot", [(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]),
        **_percentiles("itl", [g for t in timings for g in t.gaps]),
        **_percentiles("e2e", e2e),
    }
