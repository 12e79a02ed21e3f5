"""Per-request timings from per-token timestamps (transformers' runs), summarized by the same
``tools.serving_benchmark.summarize`` as autoglm-jax's streamed timings.

Owns: ``RequestTiming`` and building it from token timestamps. The summary: output tokens/s and
requests/s over the run (first submission -> last token), and TTFT / TPOT / ITL / end-to-end mean, p50,
p90, p99 in ms (``e2e_mean_ms`` is the "mean latency" of the tables). Definitions:
TTFT = submit -> first output token; TPOT = (last token - first token) / (tokens - 1); ITL = the gap
between successive tokens (a streamed update that brings k tokens counts its gap / k, k times).

A timing is anything with ``submitted``, ``first``, ``last`` (seconds, one clock), ``tokens`` and
``gaps`` (per-token inter-token latencies): ``tools.serving_benchmark.Timing`` (streamed from the
engine) or ``RequestTiming`` (from per-token timestamps, e.g. transformers' ``record_timestamps``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np



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
