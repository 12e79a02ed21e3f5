"""Drives a started ``AutoGLMEngine`` with a ``ServingWorkload``: submit at the arrival times, time every stream.

Owns: submission (one consumer thread per request, as ``tools.serving_benchmark.run_benchmark`` does,
but with each request's own output length, so mixed-length workloads run too) and the GPU utilisation
window around it. Greedy, EOS ignored, exactly ``output_len`` tokens per request. The engine is reused
across calls, so a rate sweep compiles once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from _serving_gpu import UtilizationSampler
from _serving_metrics import summarize
from _serving_workload import ServingWorkload

from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tools.serving_benchmark import _Timing


def run_requests(engine, workload: ServingWorkload, sample_gpu: bool) -> dict[str, Any]:
    """Runs ``workload`` against ``engine`` (started); returns ``summarize``'s metrics + GPU utilisation."""
    requests = workload.requests(engine.core.model_config.vocab_size)
    timings = [_Timing() for _ in requests]
    threads = []
    with UtilizationSampler(enabled=sample_gpu) as gpu:
        start = time.perf_counter()
        for (prompt, output_len), at, timing in zip(requests, workload.arrival_times(), timings):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            params = SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0.0)
            timing.submitted = time.perf_counter()
            handle = engine.submit({"prompt_token_ids": prompt}, params)
            thread = threading.Thread(target=timing.consume, args=(handle,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    short = [i for i, (t, (_, n)) in enumerate(zip(timings, requests)) if t.tokens != n]
    if short:
        raise RuntimeError(f"{len(short)} requests ended early (request {short[0]}: {timings[short[0]].tokens} of "
                           f"{requests[short[0]][1]} tokens); the engine failed or aborted them")
    return {**summarize(timings, start), "input_tokens": sum(len(p) for p, _ in requests), **gpu.summary()}
