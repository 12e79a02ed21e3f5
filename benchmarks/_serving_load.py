"""Drives a started ``AutoGLMEngine`` with a ``ServingWorkload``: submit at the arrival times, time every stream.

Owns: each request's own output length (so mixed-length workloads run too), the check that every
request got all its tokens, and the GPU utilisation window around ``tools.serving_benchmark.time_requests``.
Greedy, EOS ignored, exactly ``output_len`` tokens per request. The engine is reused across calls, so a
rate sweep compiles once.
"""

from __future__ import annotations

from typing import Any

from _serving_gpu import UtilizationSampler
from _serving_workload import ServingWorkload

from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tools.serving_benchmark import summarize, time_requests


def run_requests(engine, workload: ServingWorkload, sample_gpu: bool) -> dict[str, Any]:
    """Runs ``workload`` against ``engine`` (started); returns ``summarize``'s metrics + GPU utilisation."""
    requests = workload.requests(engine.core.model_config.vocab_size)
    submissions = [({"prompt_token_ids": prompt}, SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True,
                                                                 temperature=0.0)) for prompt, n in requests]
    with UtilizationSampler(enabled=sample_gpu) as gpu:
        timings, start = time_requests(engine, submissions, workload.arrival_times())
    short = [i for i, (t, (_, n)) in enumerate(zip(timings, requests)) if t.tokens != n]
    if short:
        raise RuntimeError(f"{len(short)} requests ended early (request {short[0]}: {timings[short[0]].tokens} of "
                           f"{requests[short[0]][1]} tokens); the engine failed or aborted them")
    return {**summarize(timings, start), "input_tokens": sum(len(p) for p, _ in requests), **gpu.summary()}
