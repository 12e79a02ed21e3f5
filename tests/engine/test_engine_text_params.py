"""Tokenizer-level ``SamplingParams`` fields end to end through ``LLM.generate`` / ``LLM.chat`` on the
default SmolLM2: stop strings spanning tokens (trimmed as vLLM), include_stop_str_in_output,
ignore_eos with the model's real EOS, skip_special_tokens."""

from __future__ import annotations

import pytest

from autoglm_jax.sampling_params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def chat_prompt(_default_engine_session):
    engine = _default_engine_session
    if engine.core is None:
        engine.start()
    ids = engine.core.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    return {"prompt_token_ids": ids}


def test_chat_and_eos(default_llm):
    out = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0]
    eos = default_llm.engine.eos_token_ids[0]
    assert "Paris" in out.text
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    assert out.token_ids[-1] == eos and eos not in out.token_ids[:-1]


def test_ignore_eos_and_skip_special_tokens(default_llm, chat_prompt):
    tokenizer = default_llm.get_tokenizer()
    normal = default_llm.generate(chat_prompt, SamplingParams(temperature=0, max_tokens=48),
                                  use_tqdm=False)[0].outputs[0]
    n = len(normal.token_ids) + 4
    params = dict(temperature=0, max_tokens=n, ignore_eos=True)
    skipped, kept = default_llm.generate([chat_prompt] * 2, [SamplingParams(**params),
                                                             SamplingParams(**params, skip_special_tokens=False)],
                                         use_tqdm=False)
    skipped, kept = skipped.outputs[0], kept.outputs[0]
    assert skipped.token_ids == kept.token_ids and len(skipped.token_ids) == n
    assert skipped.token_ids[: len(normal.token_ids)] == normal.token_ids, "ignore_eos runs through the EOS"
    assert skipped.finish_reason == "length"
    eos_text = tokenizer.decode([default_llm.engine.eos_token_ids[0]], skip_special_tokens=False)
    assert eos_text in kept.text and eos_text not in skipped.text
    assert normal.text in skipped.text


def _spanning_stop(tokenizer, token_ids):
    """A 4-character stop string made of the last 2 characters of one token's text and the first 2 of
    the next one's, at its first occurrence. Returns (stop, text, start of stop in text, index k of
    the token that completes it)."""
    text = tokenizer.decode(token_ids)
    for k in range(1, len(token_ids)):
        boundary = len(tokenizer.decode(token_ids[:k]))
        before, after = tokenizer.decode(token_ids[k - 1 : k]), tokenizer.decode(token_ids[k : k + 1])
        if len(before) < 2 or len(after) < 2 or not text.startswith(tokenizer.decode(token_ids[: k + 1])):
            continue
        stop = text[boundary - 2 : boundary + 2]
        if text.find(stop) == boundary - 2:
            return stop, text, boundary - 2, k
    raise AssertionError(f"no token boundary to build a stop string across in {text!r}")


def test_stop_string_spanning_tokens_is_trimmed_as_vllm(default_llm, chat_prompt):
    tokenizer = default_llm.get_tokenizer()
    full = default_llm.generate(chat_prompt, SamplingParams(temperature=0, max_tokens=48),
                                use_tqdm=False)[0].outputs[0]
    stop, text, start, k = _spanning_stop(tokenizer, full.token_ids[:-1])
    excluded, included = default_llm.generate(
        [chat_prompt] * 2, [SamplingParams(temperature=0, max_tokens=48, stop=["never appears", stop]),
                            SamplingParams(temperature=0, max_tokens=48, stop=stop, include_stop_str_in_output=True)],
        use_tqdm=False)
    for out in (excluded.outputs[0], included.outputs[0]):
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.token_ids == full.token_ids[: k + 1], "generation ends at the token completing the stop string"
    assert excluded.outputs[0].text == text[:start]
    assert included.outputs[0].text == text[: start + len(stop)]
