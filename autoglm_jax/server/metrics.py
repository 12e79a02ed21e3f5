"""Prometheus metrics of the server (``GET /metrics``), one registry per app.

Owns: HTTP request counts by endpoint and status (an ASGI middleware, so streamed responses count
too), per-request latency histograms measured at the server (time to first token, time per output
token, end-to-end), token and finish-reason counters, and gauges read live from the engine at scrape
time (running / waiting sequences, KV pages free / usable, KV usage). It does not own the engine's
own bookkeeping (``autoglm_jax.engine.metrics``).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from autoglm_jax.outputs import RequestOutput

PREFIX = "autoglm"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time (so they are current even when the engine is idle)."""

    def __init__(self, engine):
        self._engine = engine

    def collect(self):
        core = self._engine.core
        if core is None:
            return
        values = {
            "num_requests_running": ("sequences in the running batch", core.scheduler.num_running),
            "num_requests_waiting": ("sequences waiting to be scheduled", core.scheduler.num_waiting),
            "kv_cache_free_pages": ("KV cache pages free", core.allocator.num_free),
            "kv_cache_usable_pages": ("KV cache pages usable (scratch page excluded)", core.allocator.num_usable_pages),
            "kv_cache_usage_ratio": ("share of usable KV pages in use", core.allocator.utilization),
        }
        for name, (documentation, value) in values.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=self.registry)
        self.finished = Counter(f"{PREFIX}_request_success", "generated sequences finished, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "mean gap between output tokens of a request",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "request arrival to its last output",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, num_choices: int) -> "RequestTimer":
        return RequestTimer(self, num_choices)


class RequestTimer:
    """Latency of one request (of ``num_choices`` sequences), fed every cumulative output; records once,
    when the request ends."""

    def __init__(self, metrics: ServerMetrics, num_choices: int):
        self._metrics = metrics
        self._num_choices = num_choices
        self._start = time.monotonic()
        self._first_token: float | None = None
        self._last: RequestOutput | None = None
        self._last_time = self._start

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        if self._first_token is None and any(choice.token_ids for choice in output.outputs):
            self._first_token = now
            self._metrics.ttft.observe(now - self._start)
        self._last, self._last_time = output, now

    def finish(self) -> None:
        """Records counters and histograms (also for aborted requests: what they produced counts)."""
        output, metrics = self._last, self._metrics
        metrics.e2e.observe(self._last_time - self._start)
        if output is None:  # aborted before its first output
            metrics.finished.labels(finish_reason="abort").inc(self._num_choices)
            return
        longest = max((len(choice.token_ids) for choice in output.outputs), default=0)
        if self._first_token is not None and longest > 1:
            metrics.tpot.observe((self._last_time - self._first_token) / (longest - 1))
        metrics.prompt_tokens.inc(len(output.prompt_token_ids))
        metrics.generation_tokens.inc(sum(len(choice.token_ids) for choice in output.outputs))
        for choice in output.outputs:
            metrics.finished.labels(finish_reason=choice.finish_reason or "abort").inc()


class HTTPMetricsMiddleware:
    """Pure ASGI middleware counting responses by route path and status (works for streamed bodies)."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"

        async def send_counting(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counting)
