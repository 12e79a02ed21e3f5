"""Every token-level ``SamplingParams`` field, end to end through ``LLM.generate`` on the tiny model,
checked against the model's own logits computed without the engine (tests/model_runner.py).
Text-level fields (stop strings, skip_special_tokens, ignore_eos with a real EOS) are in
test_engine_text_params.py."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import assert_greedy, log_softmax, random_prompt

LOGPROB_TOL = 1e-4  # float32 engine vs float32 reference


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(np.random.default_rng(21), 13)


@pytest.fixture(scope="module")
def greedy(tiny_llm, prompt):
    return tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids


def generate_one(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def tokens(llm, prompt, **params):
    return generate_one(llm, prompt, **params).outputs[0].token_ids


def test_greedy_is_the_models_argmax(tiny_reference, prompt, greedy):
    assert_greedy(tiny_reference, prompt["prompt_token_ids"], greedy)


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-3), dict(min_p=1.0), dict(temperature=0.01)],
                         ids=["top_k=1", "top_p=0.001", "min_p=1", "temperature=0.01"])
def test_filters_that_keep_only_the_top_token_are_greedy(tiny_llm, prompt, greedy, params):
    params = {"temperature": 1.0, **params}
    assert tokens(tiny_llm, prompt, seed=9, max_tokens=24, ignore_eos=True, **params) == greedy


def test_temperature_and_seed(tiny_llm, prompt, greedy):
    hot = dict(temperature=2.0, max_tokens=24, ignore_eos=True)
    first = tokens(tiny_llm, prompt, seed=1, **hot)
    assert first != greedy, "temperature 2 sampling should leave the greedy path"
    assert tokens(tiny_llm, prompt, seed=1, **hot) == first, "same seed, same output"
    assert tokens(tiny_llm, prompt, seed=2, **hot) != first, "another seed, another output"


def _sampled_probs(reference, prompt, output, temperature):
    logits = reference.output_logits(prompt, output) / temperature
    return np.exp(log_softmax(logits))


def test_top_k_top_p_min_p_restrict_the_sampled_tokens(tiny_llm, tiny_reference, prompt):
    ids = prompt["prompt_token_ids"]
    for seed in range(3):
        out = tokens(tiny_llm, prompt, temperature=3.0, top_k=3, seed=seed, max_tokens=20, ignore_eos=True)
        probs = _sampled_probs(tiny_reference, ids, out, 3.0)
        ranks = [int((p > p[t]).sum()) + 1 for p, t in zip(probs, out)]
        assert max(ranks) <= 3, f"top_k=3 sampled ranks {ranks}"

        out = tokens(tiny_llm, prompt, temperature=3.0, top_p=0.3, seed=seed, max_tokens=20, ignore_eos=True)
        probs = _sampled_probs(tiny_reference, ids, out, 3.0)
        mass_above = [float(p[p > p[t]].sum()) for p, t in zip(probs, out)]
        assert max(mass_above) < 0.3 + 1e-5, f"top_p=0.3 sampled tokens with mass above {mass_above}"

        out = tokens(tiny_llm, prompt, temperature=3.0, min_p=0.5, seed=seed, max_tokens=20, ignore_eos=True)
        probs = _sampled_probs(tiny_reference, ids, out, 3.0)
        ratios = [float(p[t] / p.max()) for p, t in zip(probs, out)]
        assert min(ratios) >= 0.5 - 1e-5, f"min_p=0.5 sampled tokens at {ratios} of the top probability"
    unfiltered = tokens(tiny_llm, prompt, temperature=3.0, seed=0, max_tokens=20, ignore_eos=True)
    probs = _sampled_probs(tiny_reference, ids, unfiltered, 3.0)
    assert max(int((p > p[t]).sum()) + 1 for p, t in zip(probs, unfiltered)) > 3, "the filters above must bind"


def test_n_gives_distinct_indexed_samples(tiny_llm, prompt):
    out = generate_one(tiny_llm, prompt, n=3, temperature=1.5, seed=4, max_tokens=12, ignore_eos=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 12 for s in samples)
    assert len(set(samples)) == 3, f"n=3 samples should differ: {samples}"
    again = generate_one(tiny_llm, prompt, n=3, temperature=1.5, seed=4, max_tokens=12, ignore_eos=True)
    assert [tuple(c.token_ids) for c in again.outputs] == samples


def test_max_tokens(tiny_llm, prompt, greedy):
    out = generate_one(tiny_llm, prompt, temperature=0, max_tokens=7, ignore_eos=True).outputs[0]
    assert out.token_ids == greedy[:7] and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_ids_and_min_tokens(tiny_llm, prompt, greedy):
    # A token that first appears at index j > 0 of the greedy output stops it there (kept in token_ids).
    j = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    stop = greedy[j]
    out = generate_one(tiny_llm, prompt, temperature=0, max_tokens=24, stop_token_ids=[stop]).outputs[0]
    assert out.token_ids == greedy[: j + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # min_tokens=j: the stop id is masked for tokens 0..j-1 only, so it still fires at index j.
    out = generate_one(tiny_llm, prompt, temperature=0, max_tokens=24, stop_token_ids=[stop], min_tokens=j).outputs[0]
    assert out.token_ids == greedy[: j + 1], "min_tokens must not mask the stop id once min_tokens tokens exist"
    # min_tokens=j+1: the stop id cannot be generated at index j, so the output leaves the greedy path.
    out = generate_one(tiny_llm, prompt, temperature=0, max_tokens=24, stop_token_ids=[stop],
                       min_tokens=j + 1).outputs[0]
    assert len(out.token_ids) > j + 1 and out.token_ids[j] != stop and out.token_ids[:j] == greedy[:j]


def test_logprobs_match_the_models_log_softmax(tiny_llm, tiny_reference, prompt):
    out = generate_one(tiny_llm, prompt, temperature=1.0, seed=3, max_tokens=10, logprobs=3).outputs[0]
    expected = log_softmax(tiny_reference.output_logits(prompt["prompt_token_ids"], out.token_ids))
    assert len(out.logprobs) == len(out.token_ids)
    errors = []
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert token in entry and len(entry) in (3, 4)
        top3 = np.argsort(-expected[i])[:3]
        assert set(top3.tolist()) <= set(entry), f"token {i}: top-3 {top3} not all in {sorted(entry)}"
        assert entry[token].rank == int((expected[i] > expected[i][token]).sum()) + 1
        errors += [abs(lp.logprob - expected[i][tid]) for tid, lp in entry.items()]
    print(f"sample logprobs: max error {max(errors):.2e}, mean {np.mean(errors):.2e}")
    assert max(errors) < LOGPROB_TOL
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(out.logprobs, out.token_ids)))


def test_prompt_logprobs_across_prefill_chunks(tiny_llm, tiny_reference):
    prompt = random_prompt(np.random.default_rng(22), 70)  # three prefill chunks of the 32-token budget
    ids = prompt["prompt_token_ids"]
    out = generate_one(tiny_llm, prompt, temperature=0, max_tokens=2, prompt_logprobs=2)
    expected = log_softmax(tiny_reference.logits(ids))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    errors = []
    for p in range(1, len(ids)):
        entry = out.prompt_logprobs[p]
        assert ids[p] in entry and len(entry) in (2, 3)
        assert entry[ids[p]].rank == int((expected[p - 1] > expected[p - 1][ids[p]]).sum()) + 1
        errors += [abs(lp.logprob - expected[p - 1][tid]) for tid, lp in entry.items()]
    print(f"prompt logprobs: max error {max(errors):.2e}, mean {np.mean(errors):.2e}")
    assert max(errors) < LOGPROB_TOL


def _penalizer(prompt_ids, output, presence, frequency, repetition):
    """vLLM's penalties on reference logits [V] before output token ``step``."""
    def penalize(logits, step):
        counts = np.bincount(np.asarray(output[:step], np.int64), minlength=logits.shape[0])
        seen = (counts > 0) | np.isin(np.arange(logits.shape[0]), prompt_ids)
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
        return logits - frequency * counts - presence * (counts > 0)
    return penalize


@pytest.mark.parametrize("presence, frequency, repetition",
                         [(1.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.8), (0.4, 0.3, 1.3), (-0.5, 0.0, 1.0)])
def test_penalties_match_reference_and_change_the_output(tiny_llm, tiny_reference, prompt, greedy,
                                                         presence, frequency, repetition):
    out = tokens(tiny_llm, prompt, temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=presence,
                 frequency_penalty=frequency, repetition_penalty=repetition)
    ids = prompt["prompt_token_ids"]
    assert_greedy(tiny_reference, ids, out, penalize=_penalizer(ids, out, presence, frequency, repetition))
    assert out != greedy, "the penalty should change this repetitive model's output"
