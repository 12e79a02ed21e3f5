"""The official ``openai`` client against ``autoglm serve``: chat (streamed == non-streamed for greedy),
completions with logprobs, n=2, stop strings, usage equal to the tokens produced, models, metrics."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from autoglm_jax.default_model import default_model_path
from autoglm_jax.tokenizer import Tokenizer
from tests.server.conftest import API_KEY, MAX_SEQUENCE_LENGTH, MODEL

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colors."}]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == MAX_SEQUENCE_LENGTH


def test_chat_streamed_equals_non_streamed_for_greedy(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0.0, top_p=0.85, frequency_penalty=0.2)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))

    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 24


def test_chat_logprobs_count_equals_usage(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10,
                                              temperature=0.0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(entry.token for entry in content).startswith(response.choices[0].message.content[:5])
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5  # greedy picks the best token
        assert entry.bytes == list(entry.token.encode())
        assert all(math.isfinite(top.logprob) and top.logprob <= 0 for top in entry.top_logprobs)


def test_completion_with_logprobs_usage_and_seed(client):
    prompt = "The capital of France is"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.7, seed=1234, logprobs=2)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    choice = first.choices[0]
    assert first.object == "text_completion" and first.id.startswith("cmpl-")
    assert choice.text == again.choices[0].text  # same seed, same sample
    logprobs = choice.logprobs
    lengths = {len(logprobs.tokens), len(logprobs.token_logprobs), len(logprobs.top_logprobs),
               len(logprobs.text_offset)}
    assert lengths == {first.usage.completion_tokens}
    assert first.usage.prompt_tokens == len(Tokenizer.from_gguf(default_model_path()).encode(prompt))
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_completion_echo(client):
    prompt = "Once upon a time"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.0)
    assert full.choices[0].text == prompt + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0.0, echo=True, stream=True) if c.choices)
    assert streamed == full.choices[0].text


def test_n2_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.9, seed=7, n=2, logprobs=True)
    full = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert full.usage.completion_tokens == sum(len(c.logprobs.content) for c in full.choices)
    texts = {0: "", 1: ""}
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in full.choices}  # same seed: same samples
    assert usage == full.usage


def test_stop_string_ends_the_text(client):
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0)
    assert free.choices[0].text, "the model produced no text"
    stop = free.choices[0].text.strip()[:2]
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert free.choices[0].text.startswith(choice.text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0, stop=[stop], stream=True) if c.choices)
    assert streamed == choice.text


def test_health_and_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0.0)
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("autoglm_time_to_first_token_seconds_bucket", "autoglm_time_per_output_token_seconds_bucket",
                 'autoglm_http_requests_total{endpoint="/v1/chat/completions",status="200"}',
                 "autoglm_num_requests_running", "autoglm_num_requests_waiting", "autoglm_kv_cache_usage_ratio"):
        assert name in text, name
