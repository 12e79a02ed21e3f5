"""SIGTERM: the server stops accepting connections, lets the running stream finish, and exits 0.
(Stops the shared server; a later test that needs it gets a fresh one.)"""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.server.conftest import MODEL


def test_sigterm_finishes_running_stream_and_exits_zero(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    finish_reasons, done, signalled = [], False, False
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers,
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line.removeprefix("data: "))
            finish_reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
            if not signalled and any(c["delta"].get("content") for c in chunk["choices"]):
                server.process.send_signal(signal.SIGTERM)
                signalled = True
                time.sleep(1.0)
                with pytest.raises(httpx.TransportError):  # no longer accepting connections
                    httpx.get(f"{server.url}/health", timeout=5)
    assert signalled and done
    assert finish_reasons == ["length"]  # the running request was allowed to finish
    assert server.process.wait(timeout=60) == 0, server.log_tail()
