"""Load: 200 concurrent streaming chats from one process, 20 of them disconnecting early; all the others
complete, the disconnected ones are aborted, and afterwards nothing runs and every KV page is free.
Also: a non-streamed request whose client leaves is aborted at once."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL

NUM_REQUESTS = 200
NUM_DISCONNECTING = 20
MAX_TOKENS = 4
DISCONNECTING_MAX_TOKENS = 64  # long enough to be still running when the client leaves


def aborted_count(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(r'^autoglm_request_success_total\{finish_reason="abort"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def one_request(client: openai.AsyncOpenAI, index: int, disconnect: bool) -> dict:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {index}"}],
        stream=True,
        max_tokens=DISCONNECTING_MAX_TOKENS if disconnect else MAX_TOKENS, temperature=0.8, seed=index,
        stream_options={"include_usage": True})
    text, finish, usage, chunks = "", None, None, 0
    async for chunk in stream:
        chunks += 1
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if disconnect and text:
            await stream.close()
            return {"disconnected": True}
    return {"disconnected": False, "text": text, "finish": finish, "usage": usage, "chunks": chunks}


async def run_load(server) -> list[dict]:
    http_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=NUM_REQUESTS + 10), timeout=180)
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                  http_client=http_client) as client:
        disconnecting = set(range(0, NUM_REQUESTS, NUM_REQUESTS // NUM_DISCONNECTING))
        return await asyncio.gather(*(one_request(client, i, i in disconnecting) for i in range(NUM_REQUESTS)))


def test_200_concurrent_streams_with_20_disconnects(server):
    aborted_before = aborted_count(server)
    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(run_load(server), timeout=200))
    elapsed = time.monotonic() - start
    completed = [r for r in results if not r["disconnected"]]
    assert len(completed) == NUM_REQUESTS - NUM_DISCONNECTING
    for result in completed:
        assert result["finish"] in ("stop", "length"), result
        assert 1 <= result["usage"].completion_tokens <= MAX_TOKENS, result
        if result["finish"] == "length":
            assert result["usage"].completion_tokens == MAX_TOKENS, result
    gauges = server.wait_idle(timeout=10)
    assert gauges["autoglm_num_requests_running"] == 0, gauges
    assert gauges["autoglm_num_requests_waiting"] == 0, gauges
    assert gauges["autoglm_kv_cache_free_pages"] == gauges["autoglm_kv_cache_usable_pages"], gauges
    assert aborted_count(server) - aborted_before == NUM_DISCONNECTING
    print(f"{NUM_REQUESTS} streams in {elapsed:.1f} s")


def test_non_streamed_request_is_aborted_when_client_disconnects(server):
    aborted_before = aborted_count(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 400,
            "ignore_eos": True, "temperature": 1.0}
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=1.0)
    gauges = server.wait_idle(timeout=10)
    elapsed = time.monotonic() - start
    assert gauges["autoglm_num_requests_running"] == 0, gauges
    assert gauges["autoglm_kv_cache_free_pages"] == gauges["autoglm_kv_cache_usable_pages"], gauges
    assert aborted_count(server) - aborted_before == 1
    assert elapsed < 10, f"the request was not aborted promptly ({elapsed:.1f} s)"
