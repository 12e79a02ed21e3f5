"""``POST /v1/completions`` (legacy text completions): prompt -> engine -> ``text_completion`` or SSE chunks.

Owns: reading the prompt (a string, or token ids; a batch of one is unwrapped, larger batches are
refused with a 400), ``echo``, the completion-specific checks (suffix unsupported, best_of must equal
n, echo with logprobs unsupported), and the response in both forms with OpenAI's legacy logprobs
(tokens, token_logprobs, top_logprobs, text_offset). It does not own sampling checks
(``sampling.py``) nor the engine driving (``generation.py``).
"""

from __future__ import annotations

import uuid

from fastapi.responses import Response
from starlette.requests import Request

from autoglm_jax.outputs import RequestOutput
from autoglm_jax.server import generation
from autoglm_jax.server.errors import APIError
from autoglm_jax.server.logprobs import completion_logprobs
from autoglm_jax.server.protocol import CompletionRequest
from autoglm_jax.server.responses import Completion, CompletionChoice, Usage
from autoglm_jax.server.sampling import (check_request, check_token_ids, resolve_max_tokens,
                                         sampling_params)
from autoglm_jax.server.state import ServerState
from autoglm_jax.server.streaming import Delta, ResponseWriter


def prompt_ids(state: ServerState, prompt: str | list) -> tuple[list[int], str | None]:
    """(token ids, prompt text if given as text) of a single prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"batched prompts ({len(prompt)} prompts) are not supported; send one request "
                                "per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return state.tokenizer.encode(prompt), prompt
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    check_token_ids(prompt, state.vocab_size, "prompt")
    return list(prompt), None


async def create_completion(request: Request, body: CompletionRequest) -> Response:
    state: ServerState = request.app.state.server
    check_request(body, state.config)
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of={body.best_of} is not supported; it must equal n={body.n}", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs (prompt logprobs) is not supported", param="echo")
    check_token_ids(body.stop_token_ids or [], state.vocab_size, "stop_token_ids")
    ids, text = prompt_ids(state, body.prompt)
    max_tokens = resolve_max_tokens(body.max_tokens, len(ids), state.max_sequence_length, "prompt")
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs)
    echo = (text if text is not None else state.tokenizer.decode(ids)) if body.echo else ""
    writer = CompletionWriter(state, f"cmpl-{uuid.uuid4().hex}", body.logprobs, echo)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await generation.respond(request, state, ids, params, writer, stream=body.stream,
                                    include_usage=include_usage)


class CompletionWriter(ResponseWriter):
    chunk_object = "text_completion"

    def __init__(self, state: ServerState, request_id: str, logprobs: int | None, echo: str):
        super().__init__(state, request_id)
        self.top_logprobs, self.echo = logprobs, echo

    def _logprobs(self, token_ids, positions, text_offset: int):
        if self.top_logprobs is None or positions is None:
            return None
        return completion_logprobs(token_ids, positions, self.top_logprobs, self.state.token_text, text_offset)

    def completion(self, output: RequestOutput) -> Completion:
        choices = [CompletionChoice(index=c.index, text=self.echo + c.text,
                                    logprobs=self._logprobs(c.token_ids, c.logprobs, 0), finish_reason=c.finish_reason)
                   for c in output.outputs]
        return Completion(id=self.request_id, created=self.created, model=self.model, choices=choices,
                          usage=Usage.of(output))

    def opening(self, n: int) -> list[dict]:
        if not self.echo:
            return []
        return [{"index": i, "text": self.echo, "logprobs": None, "finish_reason": None} for i in range(n)]

    def delta_choice(self, delta: Delta) -> dict:
        logprobs = self._logprobs(delta.token_ids, delta.logprobs, delta.text_offset)
        return {"index": delta.index, "text": delta.text, "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": delta.finish_reason}
