"""Continuous batching is invisible in the results: a mixed, staggered batch larger than
max_batch_size gives each request exactly what it gets alone (greedy), seeded sampling does not
depend on the batch, and steady decoding runs several steps per jitted call."""

from __future__ import annotations

import numpy as np

from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import assert_greedy, random_prompt

PROMPT_LENGTHS = (3, 17, 40, 9, 61, 25, 5)   # 40 and 61 exceed the 32-token step budget: chunked prefill
MAX_TOKENS = (20, 5, 12, 30, 8, 16, 1)


def run_staggered(llm, prompts, params, arrivals):
    """Adds request i before step number arrivals[i] and steps until all finish; returns the final
    outputs in input order and the largest (running, waiting) seen."""
    core = llm.engine
    ids, final, step, peak = [None] * len(prompts), {}, 0, (0, 0)
    while len(final) < len(prompts):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                ids[i] = core.add_request(prompts[i], params[i]).request_id
        for out in core.step():
            if out.finished:
                final[out.request_id] = out
        peak = max(peak, (core.scheduler.num_running, core.scheduler.num_waiting))
        step += 1
        assert step < 500, "the engine stopped making progress"
    return [final[i] for i in ids], peak


def test_greedy_mixed_staggered_batch_is_token_identical_to_solo_runs(tiny_llm, tiny_reference):
    rng = np.random.default_rng(1)
    prompts = [random_prompt(rng, n) for n in PROMPT_LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in MAX_TOKENS]
    solo = [tiny_llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    batch, (peak_running, peak_waiting) = run_staggered(tiny_llm, prompts, params, arrivals=(0, 0, 0, 1, 1, 3, 6))

    assert peak_running == 4 and peak_waiting > 0, "the workload must overflow max_batch_size=4"
    for i, out in enumerate(batch):
        assert out.outputs[0].token_ids == solo[i], f"request {i}: batched {out.outputs[0].token_ids} != solo {solo[i]}"
    assert len(set(map(tuple, solo))) == len(solo), "outputs should differ between prompts (a degenerate model proves nothing)"
    for i in (1, 4, 6):  # solo runs are themselves the model's greedy continuation
        assert_greedy(tiny_reference, prompts[i]["prompt_token_ids"], solo[i])


def test_seeded_sampling_is_identical_across_batch_compositions(tiny_llm):
    rng = np.random.default_rng(2)
    target = random_prompt(rng, 11)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate(target, params, use_tqdm=False)[0].outputs[0].token_ids

    others = [random_prompt(rng, n) for n in (7, 33, 4)]
    other_params = [SamplingParams(temperature=0.8, seed=7, max_tokens=9), SamplingParams(temperature=0, max_tokens=20),
                    SamplingParams(temperature=1.3, top_k=20, max_tokens=12)]
    first_row = tiny_llm.generate([target, *others], [params, *other_params], use_tqdm=False)[0]
    last_row = tiny_llm.generate([*others, target], [*other_params, params], use_tqdm=False)[-1]
    staggered, _ = run_staggered(tiny_llm, [*others, target], [*other_params, params], arrivals=(0, 0, 1, 2))

    assert first_row.outputs[0].token_ids == alone
    assert last_row.outputs[0].token_ids == alone
    assert staggered[-1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=16, ignore_eos=True)
    assert tiny_llm.generate(target, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_steady_decoding_runs_several_steps_per_call(tiny_llm):
    core = tiny_llm.engine
    steps_before = core.metrics.num_steps
    out = tiny_llm.generate(random_prompt(np.random.default_rng(3), 6),
                            SamplingParams(temperature=0, max_tokens=25, ignore_eos=True), use_tqdm=False)[0]
    steps = core.metrics.num_steps - steps_before
    assert len(out.outputs[0].token_ids) == 25
    # 1 prefill step (first token) + 24 more tokens at decode_steps_per_call=4 per call.
    assert steps == 1 + 24 // core.config.decode_steps_per_call, f"{steps} steps for 25 tokens"


def test_full_batch_with_a_queue_keeps_several_decode_steps_per_call(tiny_llm):
    """A waiting request that cannot join (every batch slot taken) does not force one decode step per
    call: the full batch runs decode_steps_per_call steps per call, and the queued request starts once
    a slot frees, with the tokens it gets alone."""
    core = tiny_llm.engine
    per_call = core.config.decode_steps_per_call
    rng = np.random.default_rng(7)
    prompts = [random_prompt(rng, 6) for _ in range(core.config.max_batch_size + 1)]
    params = SamplingParams(temperature=0, max_tokens=1 + 3 * per_call, ignore_eos=True)
    solo = tiny_llm.generate(prompts[-1], params, use_tqdm=False)[0].outputs[0].token_ids
    steps_before = core.metrics.num_steps
    batch, (peak_running, peak_waiting) = run_staggered(tiny_llm, prompts, [params] * len(prompts),
                                                        arrivals=(0,) * len(prompts))
    steps = core.metrics.num_steps - steps_before

    assert peak_running == core.config.max_batch_size and peak_waiting == 1
    # Each wave: 1 prefill step + 3 calls of per_call decode steps (one step per call would be 1 + 3 * per_call).
    assert steps == 2 * (1 + 3), f"{steps} engine steps"
    assert batch[-1].outputs[0].token_ids == solo
    assert all(len(out.outputs[0].token_ids) == 1 + 3 * per_call for out in batch)
