"""Every bad input gets its status and an OpenAI error body; the server keeps answering afterwards.
Also: overload (more requests in flight than --max_waiting_requests) is a 429, not a crash."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MAX_BATCH_SIZE, MAX_WAITING_REQUESTS, MODEL

USER = [{"role": "user", "content": "Hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LONG_TEXT = "word " * 600  # > 512 tokens

BAD_REQUESTS = [
    # (id, path, json body, status, text the message must contain)
    ("unknown-model", CHAT, {"model": "gpt-4", "messages": USER}, 404, "does not exist"),
    ("unknown-model-completions", COMPLETIONS, {"model": "x", "prompt": "a"}, 404, "does not exist"),
    ("empty-messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages: List should have at least 1 item"),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("bad-role", CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("user-without-content", CHAT, {"model": MODEL, "messages": [{"role": "user"}]}, 400, "no content"),
    ("image-part", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, "text-only"),
    ("audio-part", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400, "text-only"),
    ("temperature-high", CHAT, {"model": MODEL, "messages": USER, "temperature": 2.5}, 400, "temperature"),
    ("temperature-negative", CHAT, {"model": MODEL, "messages": USER, "temperature": -1}, 400, "temperature"),
    ("top-p-zero", CHAT, {"model": MODEL, "messages": USER, "top_p": 0}, 400, "top_p"),
    ("n-zero", CHAT, {"model": MODEL, "messages": USER, "n": 0}, 400, "n"),
    ("n-too-many", CHAT, {"model": MODEL, "messages": USER, "n": 1000, "temperature": 1}, 400, "n=1000"),
    ("greedy-n2", CHAT, {"model": MODEL, "messages": USER, "n": 2, "temperature": 0}, 400, "greedy"),
    ("max-tokens-zero", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-beyond-context", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 100000}, 400,
     "maximum context length"),
    ("prompt-beyond-context", COMPLETIONS, {"model": MODEL, "prompt": LONG_TEXT}, 400, "maximum context length"),
    ("prompt-plus-max-tokens", COMPLETIONS, {"model": MODEL, "prompt": "word " * 400, "max_tokens": 200}, 400,
     "maximum context length"),
    ("presence-penalty", CHAT, {"model": MODEL, "messages": USER, "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency-penalty-nan", CHAT, {"model": MODEL, "messages": USER, "frequency_penalty": "nan"}, 400,
     "frequency_penalty"),
    ("top-logprobs-without-logprobs", CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, 400,
     "requires logprobs"),
    ("top-logprobs-too-many", CHAT, {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("empty-stop", CHAT, {"model": MODEL, "messages": USER, "stop": [""]}, 400, "stop"),
    ("stream-options-without-stream", CHAT, {"model": MODEL, "messages": USER,
                                             "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("seed-beyond-int64", CHAT, {"model": MODEL, "messages": USER, "seed": 2**70}, 400, "seed"),
    ("logit-bias", CHAT, {"model": MODEL, "messages": USER, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("tools", CHAT, {"model": MODEL, "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("stop-token-id-outside-vocab", CHAT, {"model": MODEL, "messages": USER, "stop_token_ids": [10**9]}, 400,
     "outside the vocabulary"),
    ("empty-prompt", COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("empty-token-prompt", COMPLETIONS, {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("empty-prompt-in-batch", COMPLETIONS, {"model": MODEL, "prompt": [""]}, 400, "prompt must not be empty"),
    ("token-outside-vocab", COMPLETIONS, {"model": MODEL, "prompt": [1, 2, 10**8]}, 400, "outside the vocabulary"),
    ("batched-prompts", COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, 400, "batched prompts"),
    ("logprobs-too-many", COMPLETIONS, {"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("suffix", COMPLETIONS, {"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("prompt-wrong-type", COMPLETIONS, {"model": MODEL, "prompt": {"x": 1}}, 400, "prompt"),
]


def assert_error_body(response: httpx.Response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert text in error["message"], error["message"]


@pytest.mark.parametrize("path, body, status, text", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_error_body(server, path, body, status, text):
    response = httpx.post(server.url + path, json=body, headers=server.headers, timeout=30)
    assert_error_body(response, status, text)


@pytest.mark.parametrize("content, content_type", [(b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                                                   (b"", "application/json"), (b"model=x", "text/plain")])
def test_malformed_body_is_400(server, content, content_type):
    response = httpx.post(server.url + CHAT, content=content, timeout=30,
                          headers={**server.headers, "Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_api_key_is_checked(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert_error_body(response, 401, "API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # health needs no key


def test_openai_client_raises_typed_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="text-only"):
        client.chat.completions.create(model=MODEL, stream=True, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_unknown_route_is_openai_shaped_404(server):
    response = httpx.get(f"{server.url}/v1/engines", headers=server.headers, timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_server_answers_after_bad_requests(server):
    for _, path, body, _, _ in BAD_REQUESTS:
        httpx.post(server.url + path, json=body, headers=server.headers, timeout=30)
    response = httpx.post(server.url + CHAT, headers=server.headers, timeout=60,
                          json={"model": MODEL, "messages": USER, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    gauges = server.wait_idle()
    assert gauges["autoglm_kv_cache_free_pages"] == gauges["autoglm_kv_cache_usable_pages"], gauges


async def _overload(server) -> list[int]:
    """Fills every batch slot with long streams, then sends more requests than the queue bound allows."""
    limits = httpx.Limits(max_connections=MAX_WAITING_REQUESTS + 64)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, limits=limits, timeout=60) as client:
        long_body = {"model": MODEL, "messages": USER, "max_tokens": 400, "temperature": 1.0, "ignore_eos": True,
                     "stream": True}
        holders = []
        for _ in range(MAX_BATCH_SIZE):
            stream = client.stream("POST", CHAT, json=long_body)
            response = await stream.__aenter__()
            assert response.status_code == 200
            holders.append(stream)
        short = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
        extra = MAX_WAITING_REQUESTS - MAX_BATCH_SIZE + 20
        tasks = [asyncio.create_task(client.post(COMPLETIONS, json=short)) for _ in range(extra)]
        statuses = []
        for task in asyncio.as_completed(tasks, timeout=60):
            try:
                response = await task
            except (httpx.TimeoutException, asyncio.TimeoutError):
                break
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert_error_body(response, 429, "overloaded")
            if statuses.count(429) >= 20:
                break
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in holders:
            await stream.__aexit__(None, None, None)
        return statuses


def test_overload_is_429_and_recovers(server):
    statuses = asyncio.run(asyncio.wait_for(_overload(server), timeout=120))
    assert statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}, statuses
    gauges = server.wait_idle()  # the cancelled requests were aborted: their pages are free
    assert gauges["autoglm_num_requests_running"] == 0, gauges
    assert gauges["autoglm_kv_cache_free_pages"] == gauges["autoglm_kv_cache_usable_pages"], gauges
    response = httpx.post(server.url + COMPLETIONS, headers=server.headers, timeout=60,
                          json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
