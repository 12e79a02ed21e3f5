"""Fuzz: schemathesis generates valid and invalid requests from the server's own OpenAPI schema
(a bounded number per endpoint and mode); no response may be a 5xx, and the server stays healthy."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

from tests.server.conftest import MODEL

MAX_EXAMPLES = 30
GENERATION_BOUNDS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2}  # keep valid requests cheap on CPU
OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]
# Negative cases (bodies that break the schema) exist only for operations that take input.
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"]


def bounded(body, mode: GenerationMode):
    """The body with generation lengths capped (invalid values are kept, to be refused); valid cases
    name the served model, so that they reach the engine instead of stopping at the 404."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if mode == GenerationMode.POSITIVE:
        body["model"] = MODEL
    for name, bound in GENERATION_BOUNDS.items():
        value = body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound:
            body[name] = bound
    body.setdefault("max_tokens", GENERATION_BOUNDS["max_tokens"])
    return body


def test_schema_lists_every_endpoint(server):
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert {(method, path) for method, path in OPERATIONS} <= {
        (method.upper(), path) for path, methods in paths.items() for method in methods}


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_server_errors(server, method, path, mode):
    operation = schemathesis.openapi.from_url(f"{server.url}/openapi.json")[path][method]
    statuses = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], database=None, derandomize=True)
    def check(case):
        case.body = bounded(case.body, mode)
        response = case.call(base_url=server.url, headers=server.headers, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{method} {path} {case.body!r} -> {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
    assert statuses, "no case was generated"
    if mode == GenerationMode.POSITIVE and method == "POST":
        assert 200 in statuses, f"no generated request reached the engine: {statuses}"


def test_healthy_after_fuzzing(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    gauges = server.wait_idle()
    assert gauges["autoglm_kv_cache_free_pages"] == gauges["autoglm_kv_cache_usable_pages"], gauges
