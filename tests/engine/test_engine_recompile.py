"""After ``warmup()`` a varied workload never recompiles: the jitted steps are not traced again and
their jit caches do not grow (prompt lengths, batch sizes, every sampling option, n > 1, logprobs,
long stop-id lists with min_tokens, aborts)."""

from __future__ import annotations

import numpy as np

from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import jit_cache_sizes, num_ladder_buckets, random_prompt


def varied_workload(rng):
    lengths = (1, 2, 15, 16, 17, 31, 32, 33, 64, 100)
    params = [
        SamplingParams(temperature=0, max_tokens=7),
        SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=12),
        SamplingParams(temperature=1.2, top_k=5, min_p=0.05, max_tokens=5, logprobs=5),
        SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                       max_tokens=9, prompt_logprobs=2),
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6),
        SamplingParams(temperature=0, min_tokens=4, stop_token_ids=list(range(3, 15)), max_tokens=10),
        SamplingParams(temperature=0.5, ignore_eos=True, max_tokens=20, logprobs=0),
        SamplingParams(temperature=0, stop_token_ids=[7, 8], max_tokens=3),
        SamplingParams(temperature=0.9, seed=None, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=None),
    ]
    return [random_prompt(rng, n) for n in lengths], params


def test_no_recompilation_after_warmup(tiny_llm):
    core = tiny_llm.engine
    runner = core.runner
    assert runner.num_traces == num_ladder_buckets(runner), (
        f"{runner.num_traces} traces but the ladder has {num_ladder_buckets(runner)} buckets: something "
        "(this or an earlier test's workload) recompiled after warmup")
    traces, caches = runner.num_traces, jit_cache_sizes(runner)
    prompts, params = varied_workload(np.random.default_rng(5))

    tiny_llm.generate(prompts, params, use_tqdm=False)
    for single in range(3):  # batch sizes 1 and partial buckets
        tiny_llm.generate(prompts[single], params[single], use_tqdm=False)
    request_id = core.add_request(prompts[6], params[6]).request_id
    core.step()
    core.abort(request_id)
    tiny_llm.generate(prompts[:5], params[:5], use_tqdm=False)

    assert runner.num_traces == traces, f"{runner.num_traces - traces} retraces after warmup"
    assert jit_cache_sizes(runner) == caches, f"jit caches grew from {caches} to {jit_cache_sizes(runner)}"
