"""Drives a started ``AutoGLMEngine`` with a ``ServingWorkload``: submit at the arrival times, time every stream.

Owns: each request's own output length (so mixed-length workloads run too), the check that every
request got all its tokens, and the GPU utilisation window around ``tools.serving_benchmark.time_requests``.
Greedy, EOS ignored, exactly ``output_len`` tokens per request. The engine is reused across calls, so a
rate sweep compiles once. With ``step_log`` the engine logs every call of the run (``engine.step_log``)
and the metrics carry its ``summarize_steps`` summary as "step_log".
"""

from __future__ import annotations

from typing import Any

from _serving_gpu import UtilizationSampler
from _serving_workload import ServingWorkload

from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tools.serving_benchmark import summarize, time_requests


def run_requests(engine, workload: ServingWorkload, sample_gpu: bool, step_log: bool = False) -> dict[str, Any]:
    """Runs ``workload`` against ``engine`` (started, idle); returns ``summarize``'s metrics + GPU utilisation
    (+ "step_log": the engine calls' summary, when ``step_log``)."""
    requests = workload.requests(engine.core.model_config.vocab_size)
    submissions = [({"prompt_token_ids": prompt}, SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True,
                                                                 temperature=0.0)) for prompt, n in requests]
    log = engine.core.enable_step_log() if step_log else None  # the engine thread is idle between runs
    try:
        with UtilizationSampler(enabled=sample_gpu) as gpu:
            timings, start = time_requests(engine, submissions, workload.arrival_times())
    finally:
        if log is not None:
            engine.core.disable_step_log()  # every stream ended: the engine thread is idle again
    short = [i for i, (t, (_, n)) in enumerate(zip(timings, requests)) if t.tokens != n]
    if short:
        raise RuntimeError(f"{len(short)} requests ended early (request {short[0]}: {timings[short[0]].tokens} of "
                           f"{requests[short[0]][1]} tokens); the engine failed or aborted them")
    metrics = {**summarize(timings, start), "input_tokens": sum(len(p) for p, _ in requests), **gpu.summary()}
    return metrics if log is None else {**metrics, "step_log": log.summary()}
