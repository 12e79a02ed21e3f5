"""SequenceState.extend (a step's tokens at once; StopChecker.update_many, IncrementalDetokenizer.add_each)
gives, after every step, the tokens, text, finish reason and logprob sum of feeding the tokens one at a
time through IncrementalDetokenizer.add and StopChecker.update: EOS, stop token ids, min_tokens, max_tokens,
the model length, stop strings (kept or cut), multi-token characters, logprobs, with and without a tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from autoglm_jax.default_model import default_model_path
from autoglm_jax.detokenizer import IncrementalDetokenizer
from autoglm_jax.engine.output_state import SequenceState
from autoglm_jax.engine.runner import SampledTokens
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.stop_checker import StopChecker
from autoglm_jax.tokenizer import Tokenizer

TEXT = "Hello world 😀 日本語 👍🏽 naïve café, the end.\n def f(x): return x"
CASES = [
    SamplingParams(max_tokens=40),
    SamplingParams(max_tokens=40, min_tokens=12),
    SamplingParams(max_tokens=40, min_tokens=5, stop_token_ids=[11, 13]),
    SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[13]),
    SamplingParams(max_tokens=None, ignore_eos=True),  # ends at the model length
    SamplingParams(max_tokens=40, stop=["日本", "e e"]),
    SamplingParams(max_tokens=40, stop=["😀", "af"], include_stop_str_in_output=True, min_tokens=2),
    SamplingParams(max_tokens=40, logprobs=2, stop_token_ids=[11]),
    SamplingParams(max_tokens=40, skip_special_tokens=False),
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf(default_model_path())


def token_stream(tokenizer, rng: random.Random, eos: int) -> list[int]:
    """Pieces of real text (characters spanning tokens) mixed with eos, stop ids and random ids."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False) if tokenizer is not None else list(range(20, 60))
    out = []
    while len(out) < 60:
        start = rng.randrange(len(ids))
        out += ids[start : start + rng.randint(1, 6)]
        out.append(rng.choice([eos, 11, 13, 5]) if rng.random() < 0.5 else rng.randrange(3, 600))
    return out


def one_at_a_time(params, prompt, tokenizer, eos_ids, max_model_len):
    """The reference: each token through the detokenizer and the stop checker in turn."""
    stop = StopChecker(params, eos_ids, prompt_len=len(prompt), max_model_len=max_model_len)
    detok = (IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=params.skip_special_tokens)
             if tokenizer is not None else None)

    def feed(token_id: int) -> bool:
        delta = detok.add(token_id) if detok is not None else ""
        return stop.update(token_id, delta).finished

    return stop, feed


@pytest.mark.parametrize("with_tokenizer", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_extend_by_steps_equals_one_token_at_a_time(tokenizer, case, with_tokenizer):
    params, rng = CASES[case], random.Random(case)
    if params.stop and not with_tokenizer:
        pytest.skip("stop strings need a tokenizer")
    tok = tokenizer if with_tokenizer else None
    eos_ids = tuple(tokenizer.eos_token_ids) + (5,)  # a second id acts as a stop token id
    prompt, max_model_len = [rng.randrange(3, 600) for _ in range(7)], 7 + 33
    for trial in range(6):
        tokens = token_stream(tok, rng, eos_ids[0])
        seq = SequenceState("s", 0, params, prompt, tok, eos_ids, max_model_len)
        stop, feed = one_at_a_time(params, prompt, tok, eos_ids, max_model_len)
        taken, logprob_sum, position = [], 0.0, 0
        while not seq.finished and position < len(tokens):
            size = rng.choice([1, 1, 2, 3, 8])
            chunk = tokens[position : position + size]
            logprobs = [-rng.random() for _ in chunk]
            top_ids = np.asarray([[rng.randrange(600) for _ in range(3)] for _ in chunk], np.int32)
            top = np.sort(np.asarray([[-rng.random() for _ in range(3)] for _ in chunk], np.float32))[:, ::-1]
            count = seq.extend(SampledTokens(chunk, logprobs, [1] * len(chunk), top_ids[None], top[None], 0))
            for i, token_id in enumerate(chunk):  # the reference, one token at a time
                taken.append(token_id)
                logprob_sum += logprobs[i]
                if feed(token_id):
                    break
            assert count == len(taken) - position, f"trial {trial}: took {count} of {chunk}, reference {taken[position:]}"
            position += count
            assert seq.token_ids == taken and seq.text == stop.output_text
            assert (seq.finish_reason, seq.stop_reason) == (stop.finish_reason, stop.stop_reason)
            assert seq.cumulative_logprob == logprob_sum
            if params.logprobs is not None:
                assert len(seq.logprobs) == len(taken)
        assert seq.finished, f"trial {trial}: {len(tokens)} tokens never finished {params}"
