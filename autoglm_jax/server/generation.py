"""Running one request on the engine from an HTTP handler: submit, iterate, abort when the client leaves.

Owns: ``submit`` (engine exceptions -> ``APIError`` before any response byte is sent), ``outputs``
(the cumulative ``RequestOutput``s of a submitted request; leaving the iteration early for any reason
- disconnect, cancellation, error - aborts the request, which frees its KV pages at once) and
``final_output`` / ``GenerationStream`` (a non-streamed / streamed response that aborts its request
when the client disconnects, even one that leaves before the first output was awaited), and
``respond``, which ties them together for a handler. It does not own response formats
(``chat.py``, ``completions.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from autoglm_jax.engine.async_engine import AutoGLMEngine, EngineStoppedError, RequestHandle
from autoglm_jax.outputs import RequestOutput
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.server.errors import from_engine_error
from autoglm_jax.server.metrics import RequestTimer
from autoglm_jax.server.state import ServerState
from autoglm_jax.server.streaming import ResponseWriter, sse_events


def submit(engine: AutoGLMEngine, prompt_token_ids: list[int], params: SamplingParams,
           request_id: str) -> RequestHandle:
    try:
        return engine.submit({"prompt_token_ids": prompt_token_ids}, params, request_id)
    except Exception as error:  # noqa: BLE001 - from_engine_error re-raises what is not a request error
        raise from_engine_error(error) from error


async def outputs(engine: AutoGLMEngine, handle: RequestHandle, timer: RequestTimer) -> AsyncIterator[RequestOutput]:
    """Cumulative outputs of ``handle``; wrap in ``contextlib.aclosing`` so an early exit aborts at once."""
    finished = False
    try:
        async for output in handle:
            timer.observe(output)
            finished = output.finished
            yield output
    finally:
        if not finished:
            engine.abort(handle.request_id)
        timer.finish()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def abort_unfinished(engine: AutoGLMEngine, handle: RequestHandle) -> None:
    if not handle.done:
        engine.abort(handle.request_id)


class GenerationStream(StreamingResponse):
    """An SSE response that aborts its request however the response ends (the body iterator may never
    have started if the client left at once, so its own clean-up cannot be relied on)."""

    def __init__(self, content: AsyncIterator[str], engine: AutoGLMEngine, handle: RequestHandle):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._engine, self._handle = engine, handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            abort_unfinished(self._engine, self._handle)


async def final_output(request: Request, engine: AutoGLMEngine, handle: RequestHandle,
                       stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The last output of ``stream``; None (and the request aborted) if the client disconnected first."""

    async def last() -> RequestOutput | None:
        result = None
        async with contextlib.aclosing(stream) as iterator:
            async for result in iterator:
                pass
        return result

    generation = asyncio.ensure_future(last())
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({generation, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not generation.done():
            generation.cancel()
            await asyncio.gather(generation, return_exceptions=True)
        abort_unfinished(engine, handle)
    if generation.cancelled():
        return None
    try:
        return generation.result()
    except EngineStoppedError as error:  # shutting down: the request never ran
        raise from_engine_error(error) from error


async def respond(request: Request, state: ServerState, prompt_token_ids: list[int], params: SamplingParams,
                  writer: ResponseWriter, *, stream: bool, include_usage: bool) -> Response:
    """Submits the request and answers with SSE events (``stream``) or the whole response."""
    handle = submit(state.engine, prompt_token_ids, params, writer.request_id)
    results = outputs(state.engine, handle, state.metrics.timer(params.n))
    if stream:
        events = sse_events(results, params.n, opening=writer.opening(params.n), delta_choice=writer.delta_choice,
                            make_chunk=writer.chunk_maker(include_usage))
        return GenerationStream(events, state.engine, handle)
    final = await final_output(request, state.engine, handle, results)
    if final is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    return JSONResponse(writer.completion(final).model_dump())
