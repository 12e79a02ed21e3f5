"""The serving benchmark: offline (all requests at once) or Poisson-rate online load through ``AutoGLMEngine``.

Owns: the synthetic workload (random prompt token ids of fixed length, fixed output lengths with
``ignore_eos``), submitting it at its arrival times, timing every streamed token on the client side,
and the summary: output tokens/s, requests/s, TTFT / TPOT / ITL / end-to-end p50, p90, p99 in ms.
It also runs one configuration in a fresh process (``run_isolated``), as the autotuner does per
trial, so each trial gets the whole device and a crash stays a failed trial.

TTFT: submit -> first output token. TPOT: (last token - first token) / (tokens - 1). ITL: the gap
between successive streamed updates, divided by the tokens the update brought.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import multiprocessing
import time
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    input_len: int = 128
    output_len: int = 64
    request_rate: float | None = None  # requests/s (Poisson arrivals); None = offline, all at t=0
    seed: int = 0

    def __post_init__(self):
        for name in ("num_requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request_rate={self.request_rate} must be > 0 (or None for offline)")

    def prompts(self, vocab_size: int) -> list[dict]:
        rng = np.random.default_rng(self.seed)
        return [{"prompt_token_ids": rng.integers(3, vocab_size, self.input_len).tolist()}
                for _ in range(self.num_requests)]

    def arrival_times(self) -> np.ndarray:
        """Seconds after start; Poisson process at ``request_rate`` (all zero offline)."""
        if self.request_rate is None:
            return np.zeros(self.num_requests)
        gaps = np.random.default_rng(self.seed + 1).exponential(1.0 / self.request_rate, self.num_requests)
        return np.cumsum(gaps) - gaps[0]


def _percentiles(prefix: str, values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {f"{prefix}_{q}_ms": float("nan") for q in ("mean", "p50", "p90", "p99")}
    ms = np.asarray(values_s) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {f"{prefix}_mean_ms": float(ms.mean()), f"{prefix}_p50_ms": float(p50), f"{prefix}_p90_ms": float(p90),
            f"{prefix}_p99_ms": float(p99)}


class Timing:
    """Client-side timestamps of one request's stream (``submitted``, ``first``, ``last``: seconds on
    ``time.perf_counter``; ``tokens``; ``gaps``: per-token inter-token latencies)."""

    def __init__(self):
        self.submitted = self.first = self.last = None
        self.tokens = 0
        self.gaps: list[float] = []

    def consume(self, handle) -> None:
        for output in handle:
            self.record(output)

    async def consume_async(self, handle) -> None:
        async for output in handle:
            self.record(output)

    def record(self, output) -> None:
        """Timestamps one streamed update (the cumulative output of the request)."""
        now = time.perf_counter()
        count = len(output.outputs[0].token_ids)
        if count > self.tokens:
            if self.first is None:
                self.first = now
            else:
                self.gaps += [(now - self.last) / (count - self.tokens)] * (count - self.tokens)
            self.last, self.tokens = now, count


def summarize(timings: Sequence, start: float | None = None) -> dict[str, Any]:
    """The metrics dict of a finished run. ``timings``: anything with Timing's fields; ``start``: when
    the run began (default: the first submission)."""
    if not timings:
        raise ValueError("no requests to summarize")
    start = min(t.submitted for t in timings) if start is None else start
    duration = max(t.last for t in timings) - start
    if duration <= 0:
        raise ValueError(f"run duration {duration} s must be > 0")
    output_tokens = sum(t.tokens for t in timings)
    return {
        "num_requests": len(timings), "duration_s": duration, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration, "requests_per_s": len(timings) / duration,
        **_percentiles("ttft", [t.first - t.submitted for t in timings]),
        **_percentiles("tpot", [(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]),
        **_percentiles("itl", [g for t in timings for g in t.gaps]),
        **_percentiles("e2e", [t.last - t.submitted for t in timings]),
    }


def time_requests(engine, requests: Sequence[tuple[dict, Any]], arrival_times) -> tuple[list[Timing], float]:
    """Submits each (prompt, SamplingParams) to a started ``AutoGLMEngine`` at its arrival time (seconds
    after the start) and consumes every stream in one asyncio event loop (in one client thread), as an async
    HTTP client does (one OS thread per stream had ~256 threads wake on each engine step, fighting the
    engine loop for the GIL); returns (timings, start) once every stream ended."""
    timings = [Timing() for _ in requests]

    async def one(prompt, params, at: float, timing: Timing, start: float) -> None:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        timing.submitted = time.perf_counter()
        await timing.consume_async(engine.submit(prompt, params))

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(prompt, params, at, timing, start)
                               for (prompt, params), at, timing in zip(requests, arrival_times, timings)))
        return start

    # Its own thread: the caller may be inside a running event loop (a notebook), where asyncio.run fails.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="serving-client") as client:
        return timings, client.submit(asyncio.run, run()).result()


def run_benchmark(engine, workload: Workload) -> dict[str, Any]:
    """Runs the workload against a started ``AutoGLMEngine``; returns the metrics dict."""
    from autoglm_jax.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=workload.output_len, min_tokens=workload.output_len, ignore_eos=True,
                            temperature=0.0)
    prompts = workload.prompts(engine.core.model_config.vocab_size)
    timings, start = time_requests(engine, [(prompt, params) for prompt in prompts], workload.arrival_times())
    return summarize(timings, start)


def benchmark_settings(settings: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """Starts an engine with ``settings`` (EngineConfig fields), runs the workload, stops the engine."""
    from autoglm_jax.engine.async_engine import AutoGLMEngine

    engine = AutoGLMEngine({"show_progress": False, **settings, "skip_tokenizer_init": True}).start()
    try:
        return run_benchmark(engine, workload)
    finally:
        engine.stop(drain=False)


def _child(settings, workload, results) -> None:
    try:
        results.put(("ok", benchmark_settings(settings, workload)))
    except BaseException as error:  # reported to the parent as a failed trial
        results.put(("error", f"{type(error).__name__}: {error}"))


def run_isolated(settings: dict[str, Any], workload: Workload, timeout_s: float = 1800.0) -> dict[str, Any]:
    """``benchmark_settings`` in a fresh (spawned) process; raises RuntimeError if it fails or times out."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(settings, workload, results), daemon=True)
    process.start()
    try:
        status, payload = results.get(timeout=timeout_s)
    except Exception:
        process.kill()
        raise RuntimeError(f"benchmark process gave no result within {timeout_s} s (exit code {process.exitcode})")
    finally:
        process.join(timeout=30)
    if status != "ok":
        raise RuntimeError(payload)
    return payload
