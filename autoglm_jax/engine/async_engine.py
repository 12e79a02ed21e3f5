"""``AutoGLMEngine``: the serving loop in a background thread, with sync and async streaming.

Owns: the thread that drives ``EngineCore.step`` (with the adaptive batching window), the inbox
through which other threads submit and abort, and the per-request handles they wait on. Requests
are validated in the caller's thread, so a bad request raises there and nobody else is affected.

    engine = AutoGLMEngine({"use_dynamic_batching": True, "max_batch_size": 32,
                            "max_sequence_length": 2048, "prefill_ratio": 0.8}).start()
    out = engine.generate("Hello", SamplingParams(max_tokens=32))
    for partial in engine.stream("Hello"): ...            # cumulative RequestOutputs
    async for partial in engine.stream_async("Hello"): ...
    engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Iterator

from autoglm_jax.engine.batching_window import BatchingWindow, BatchingWindowConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.outputs import RequestOutput
from autoglm_jax.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine is not running (not started, or stopped)."""


def _set_all(events: list) -> None:
    for event in events:
        event.set()


def wake_loops(wakeups: dict) -> None:
    """Sets each asyncio loop's events (loop -> [asyncio.Event]) from another thread: one
    ``call_soon_threadsafe`` per loop. A loop closed meanwhile has nobody left to wake."""
    for loop, events in wakeups.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the loop is closed
            pass


class RequestHandle:
    """A submitted request: the latest cumulative output, completion, and waiting (threads or asyncio)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._cond = threading.Condition()
        self._latest: RequestOutput | None = None
        self._version = 0
        self._error: BaseException | None = None
        self._done = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self._done

    def _publish(self, output: RequestOutput | None, error: BaseException | None = None,
                 wakeups: dict | None = None) -> None:
        """Makes ``output`` (or ``error``) the latest and wakes the waiters: threads at once, asyncio ones
        through their loops -- added to ``wakeups`` (loop -> events) when given, for ``wake_loops`` to
        wake with one cross-thread call per loop (a step publishes hundreds of outputs)."""
        with self._cond:
            if output is not None:
                self._latest = output
            self._error = error or self._error
            self._done = self._done or error is not None or (output is not None and output.finished)
            self._version += 1
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        own = wakeups is None
        wakeups = {} if own else wakeups
        for loop, event in waiters:
            wakeups.setdefault(loop, []).append(event)
        if own:
            wake_loops(wakeups)

    def _snapshot(self):
        if self._error is not None:
            raise self._error
        return self._version, self._latest, self._done

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Blocks until the request finishes; returns its final RequestOutput."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            return self._snapshot()[1]

    def __iter__(self) -> Iterator[RequestOutput]:
        """Yields the cumulative output each time it changes, the final one last."""
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._version > seen or self._done)
                seen, latest, done = self._snapshot()
            if latest is not None:
                yield latest
            if done:
                return

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        seen = 0
        loop = asyncio.get_running_loop()
        while True:
            event = asyncio.Event()
            with self._cond:
                version, latest, done = self._snapshot()
                if version == seen and not done:
                    self._async_waiters.append((loop, event))
            if version == seen and not done:
                await event.wait()
                continue
            seen = version
            if latest is not None:
                yield latest
            if done:
                return


class AutoGLMEngine:
    def __init__(self, config: EngineConfig | dict | None = None, **overrides):
        self.config = EngineConfig.from_dict(config, **overrides)
        self.core: EngineCore | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._drain_on_stop = True
        self._window = BatchingWindow(BatchingWindowConfig(
            enabled=self.config.adaptive_batching or not self.config.use_dynamic_batching,
            min_wait_ms=self.config.batching_window_min_ms, max_wait_ms=self.config.batching_window_max_ms))
        self._submit_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AutoGLMEngine":
        """Loads the model (if not yet), compiles the buckets and starts the loop thread."""
        if self._running:
            return self
        if self.core is None and self.config.data_parallel_size > 1:  # replicas behind a load balancer
            from autoglm_jax.parallel.replicas import replicated_engine_core

            self.core = replicated_engine_core(self.config)  # per config.data_parallel_backend
        if self.core is None:
            self.core = EngineCore(self.config)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="autoglm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops the loop: with drain=True running and queued requests finish first; otherwise they are
        aborted (their handles finish with finish_reason "abort")."""
        if not self._running:
            return
        self._drain_on_stop = drain
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        self._running = False

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def tokenizer(self):
        return self.core.tokenizer if self.core is not None else None

    # ------------------------------------------------------------------ requests
    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> RequestHandle:
        """Queues a request; raises ValueError/TypeError here (in the caller) for bad input."""
        if not self._running:
            raise EngineStoppedError("the engine is not running: call start() first")
        if len(self._handles) >= self.config.max_waiting_requests:
            raise OverflowError(f"too many requests in flight (max_waiting_requests={self.config.max_waiting_requests})")
        with self._submit_lock:  # request ids and validation use shared (read-only) state
            if request_id is not None and request_id in self._handles:
                raise ValueError(f"request_id {request_id!r} is already in use")
            state = self.core.prepare_request(prompt, params, request_id)
            handle = RequestHandle(state.request_id)
            self._handles[state.request_id] = handle
        self._inbox.put(("add", state))
        return handle

    def generate(self, prompt, params: SamplingParams | None = None, timeout: float | None = None) -> RequestOutput:
        return self.submit(prompt, params).result(timeout)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Cumulative outputs as they grow; closing the generator early aborts the request."""
        handle = self.submit(prompt, params)
        finished = False
        try:
            for output in handle:
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(handle.request_id)

    async def stream_async(self, prompt, params: SamplingParams | None = None,
                           request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async variant of ``stream`` for servers; cancelling the consumer aborts the request."""
        handle = self.submit(prompt, params, request_id)
        finished = False
        try:
            async for output in handle:
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(handle.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def metrics(self) -> dict:
        return self.core.metrics.snapshot(time.monotonic()) if self.core is not None else {}

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        core = self.core
        stopping = False
        while True:
            idle = not core.has_unfinished_requests()
            if stopping and (idle or not self._drain_on_stop):
                break
            stopping |= self._drain_inbox(block=idle and not stopping)
            if not core.has_unfinished_requests():
                continue
            self._wait_for_batch()
            start = time.monotonic()
            try:
                outputs = core.step()
            except Exception as error:  # a bug must not kill the server: fail the affected requests
                log.exception("engine step failed")
                self._fail_all(error)
                continue
            self._window.record_step(time.monotonic() - start, core.scheduler.num_running)
            wakeups: dict = {}
            for output in outputs:
                handle = self._handles.get(output.request_id)
                if handle is not None:
                    handle._publish(output, wakeups=wakeups)
                    if output.finished:
                        self._handles.pop(output.request_id, None)
            wake_loops(wakeups)
        self._abort_remaining()

    def _drain_inbox(self, block: bool) -> bool:
        """Applies queued adds/aborts; returns True if a stop was requested."""
        stop = False
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind, payload = item
            if kind == "stop":
                stop = True
            else:
                self._apply(kind, payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return stop

    def _wait_for_batch(self) -> None:
        scheduler = self.core.scheduler
        wait = self._window.wait_time(time.monotonic(), scheduler.num_waiting, scheduler.num_running,
                                      self.config.max_batch_size)
        deadline = time.monotonic() + wait
        while wait > 0:
            try:
                kind, payload = self._inbox.get(timeout=wait)
            except queue.Empty:
                return
            if kind == "stop":
                self._inbox.put((kind, payload))  # handled by the loop after this step
                return
            self._apply(kind, payload)
            wait = min(deadline - time.monotonic(), self._window.wait_time(
                time.monotonic(), scheduler.num_waiting, scheduler.num_running, self.config.max_batch_size))

    def _apply(self, kind: str, payload) -> None:
        if kind == "abort":
            self._abort(payload)
            return
        try:
            self.core.enqueue_request(payload)
        except Exception as error:  # this request only; the engine keeps serving
            handle = self._handles.pop(payload.request_id, None)
            if handle is not None:
                handle._publish(None, error)
            return
        self._window.record_arrival(time.monotonic())

    def _abort(self, request_id: str) -> None:
        state = self.core.requests.get(request_id)
        if self.core.abort(request_id) and state is not None:
            handle = self._handles.pop(request_id, None)
            if handle is not None:
                handle._publish(state.output())

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.core.requests):
            self.core.abort(request_id)
            handle = self._handles.pop(request_id, None)
            if handle is not None:
                handle._publish(None, error)

    def _abort_remaining(self) -> None:
        for request_id in list(self.core.requests):
            self._abort(request_id)
        for handle in list(self._handles.values()):  # submitted but never enqueued
            handle._publish(None, EngineStoppedError("the engine stopped before this request ran"))
        self._handles.clear()
