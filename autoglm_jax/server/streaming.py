"""Streaming: what is new in a cumulative ``RequestOutput`` per choice, and the SSE event sequence.

Owns: ``ChoiceDeltas``, which remembers per choice how many characters, tokens and logprob positions
were sent and whether its finish was sent, and hands out ``Delta``s (the engine holds back text that
could still become a stop string, so sent text is never taken back); ``sse_events``, the order of
events shared by chat and completions; ``ResponseWriter``, the interface (and shared chunk envelope)
of their formatters. It does not own the choice formats (``chat.py``, ``completions.py``) nor
logprob formats (``logprobs.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from autoglm_jax.outputs import Logprob, RequestOutput
from autoglm_jax.server.errors import error_body
from autoglm_jax.server.responses import SSE_DONE, Usage, chunk, sse
from autoglm_jax.server.state import ServerState


@dataclasses.dataclass(frozen=True)
class Delta:
    """New output of choice ``index``: text, the token ids sampled since the last delta with their
    logprob positions (None when logprobs were not requested), and the finish reason once finished."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    text_offset: int  # where ``text`` starts in the choice's full text


class ChoiceDeltas:
    def __init__(self, n: int):
        self._chars = [0] * n
        self._tokens = [0] * n
        self._finished = [False] * n

    def update(self, output: RequestOutput) -> list[Delta]:
        """Deltas of the choices that changed (a finished choice yields one last delta, then none)."""
        deltas = []
        for choice in output.outputs:
            i = choice.index
            if self._finished[i]:
                continue
            text = choice.text[self._chars[i]:]
            token_ids = choice.token_ids[self._tokens[i]:]
            if not text and not token_ids and choice.finish_reason is None:
                continue
            logprobs = None
            if choice.logprobs is not None:
                logprobs = choice.logprobs[self._tokens[i]:len(choice.token_ids)]
            deltas.append(Delta(i, text, list(token_ids), logprobs, choice.finish_reason, self._chars[i]))
            self._chars[i] = len(choice.text)
            self._tokens[i] = len(choice.token_ids)
            self._finished[i] = choice.finish_reason is not None
        return deltas


async def sse_events(outputs: AsyncIterator[RequestOutput], n: int, *, opening: list[dict],
                     delta_choice: Callable[[Delta], dict],
                     make_chunk: Callable[[list[dict], Usage | None], dict]) -> AsyncIterator[str]:
    """The SSE body of a streamed request: ``opening`` choices (one chunk each), one chunk per choice
    delta, a usage chunk (``make_chunk([], usage)``, for ``include_usage``; ``make_chunk`` returns None
    to skip it), then ``[DONE]``. Leaving early closes ``outputs``, which aborts the request."""
    last = None
    deltas = ChoiceDeltas(n)
    try:
        async with contextlib.aclosing(outputs) as iterator:
            for choice in opening:
                yield sse(make_chunk([choice], None))
            async for last in iterator:
                for delta in deltas.update(last):
                    yield sse(make_chunk([delta_choice(delta)], None))
    except Exception as error:  # the engine failed this request mid-stream: say so in-band
        yield sse(error_body(500, f"generation failed: {error}"))
        yield SSE_DONE
        return
    usage_chunk = make_chunk([], Usage.of(last)) if last is not None else None
    if usage_chunk is not None:
        yield sse(usage_chunk)
    yield SSE_DONE


class ResponseWriter:
    """Formats one request's output, whole or as stream chunks; chat and completions subclass it."""

    chunk_object = ""  # "chat.completion.chunk" or "text_completion"

    def __init__(self, state: ServerState, request_id: str):
        self.state, self.request_id = state, request_id
        self.created = int(time.time())
        self.model = state.config.served_model_name

    def opening(self, n: int) -> list[dict]:
        """Choices streamed before any token (one chunk each)."""
        return []

    def delta_choice(self, delta: Delta) -> dict:
        raise NotImplementedError

    def completion(self, output: RequestOutput) -> BaseModel:
        raise NotImplementedError

    def chunk_maker(self, include_usage: bool) -> Callable[[list[dict], Usage | None], dict | None]:
        def make(choices: list[dict], usage: Usage | None) -> dict | None:
            if not choices and not include_usage:
                return None
            return chunk(self.chunk_object, self.request_id, self.created, self.model, choices,
                         include_usage=include_usage, usage=usage)
        return make
