"""SamplingParams: vLLM defaults, every field's validation, normalizations, greedy, clone."""

import dataclasses
import math

import pytest

from autoglm_jax.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (None, 16, 0, [], [])
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not p.greedy


BAD_VALUES = [
    ("n", 0), ("n", -3), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.0), ("top_k", "5"),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", 1.5), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 3.0),
    ("min_tokens", -1), ("min_tokens", 1.0),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [3]), ("stop", 5),
    ("stop_token_ids", [1, "2"]), ("stop_token_ids", [-1]), ("stop_token_ids", 7),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
    ("logprobs", -2), ("logprobs", 2.5), ("prompt_logprobs", -5), ("prompt_logprobs", "3"),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.inf),
    ("frequency_penalty", -3.0), ("frequency_penalty", 2.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_every_field_has_a_bad_value_test():
    validated = {name for name, _ in BAD_VALUES}
    assert validated == {f.name for f in dataclasses.fields(SamplingParams)}


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=50, max_tokens=None)


@pytest.mark.parametrize("field,value", [
    ("temperature", 0.0), ("temperature", 1.7), ("top_p", 1e-3), ("top_k", 0), ("top_k", 1),
    ("min_p", 1.0), ("seed", 0), ("seed", 2**40), ("max_tokens", None), ("max_tokens", 1),
    ("logprobs", 0), ("logprobs", -1), ("prompt_logprobs", 20), ("presence_penalty", -2.0),
    ("frequency_penalty", 2.0), ("repetition_penalty", 1e-3),
])
def test_boundary_values_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_normalizations():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=[5, 3, 5, 3, 9]).stop_token_ids == [5, 3, 9]
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(prompt_logprobs=True).prompt_logprobs == 1


def test_tiny_positive_temperature_is_raised_to_vllm_floor():
    assert SamplingParams(temperature=1e-3).temperature == pytest.approx(1e-2)


def test_greedy_resets_filters_and_requires_single_output():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.3)
    assert p.greedy
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    with pytest.raises(ValueError, match="n must be 1"):
        SamplingParams(temperature=0.0, n=2)
    assert SamplingParams(temperature=0.5, n=4).n == 4


def test_output_text_buffer_length():
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "xyz1"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["ab", "xyz1"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_clone_is_equal_and_independent():
    p = SamplingParams(temperature=0.7, stop=["x"], stop_token_ids=[4], seed=11)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(8)
    assert p.stop == ["x"] and p.stop_token_ids == [4]


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5
