"""``POST /v1/chat/completions``: messages -> chat template -> engine -> ``chat.completion`` or SSE chunks.

Owns: turning OpenAI messages into template messages (text parts joined by newlines; image, audio and
file parts refused with a 400 because the model is text-only; ``developer`` read as ``system``), the
chat-specific checks (top_logprobs needs logprobs, tools / response_format unsupported), and the
response in both forms. Streaming sends a role chunk per choice, one chunk per choice delta (the
last with its finish_reason), a usage chunk when ``stream_options.include_usage``, then
``data: [DONE]``. It does not own sampling checks (``sampling.py``) nor the engine driving
(``generation.py``).
"""

from __future__ import annotations

import uuid

import jinja2
from fastapi.responses import Response
from starlette.requests import Request

from autoglm_jax.outputs import RequestOutput
from autoglm_jax.server import generation
from autoglm_jax.server.errors import APIError
from autoglm_jax.server.logprobs import chat_logprobs
from autoglm_jax.server.protocol import ChatCompletionRequest, ChatMessage
from autoglm_jax.server.responses import (AssistantMessage, ChatChoice, ChatChoiceLogprobs, ChatCompletion,
                                          Usage)
from autoglm_jax.server.sampling import (check_request, check_token_ids, resolve_max_tokens,
                                         sampling_params)
from autoglm_jax.server.state import ServerState
from autoglm_jax.server.streaming import Delta, ResponseWriter


def template_message(index: int, message: ChatMessage, model: str) -> dict:
    """One message as the chat template reads it: role, string content (and name / tool_call_id)."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text":
                raise APIError(400, f"messages[{index}].content[{j}] is a {part.type!r} part, but the model "
                                    f"`{model}` is text-only: send only 'text' parts",
                               param=f"messages[{index}].content[{j}].type")
            if not isinstance(part.text, str):
                raise APIError(400, f"messages[{index}].content[{j}] is a text part without 'text'",
                               param=f"messages[{index}].content[{j}].text")
            texts.append(part.text)
        content = "\n".join(texts)
    if content is None:
        if message.role != "assistant":
            raise APIError(400, f"messages[{index}] ({message.role}) has no content",
                           param=f"messages[{index}].content")
        content = ""
    result = {"role": "system" if message.role == "developer" else message.role, "content": content}
    result.update({k: v for k, v in (("name", message.name), ("tool_call_id", message.tool_call_id)) if v is not None})
    return result


def chat_prompt_ids(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    if body.tools:
        raise APIError(400, "tools (function calling) are not supported by this server", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, f"response_format {body.response_format.get('type')!r} is not supported; only 'text'",
                       param="response_format")
    model = state.config.served_model_name
    messages = [template_message(i, m, model) for i, m in enumerate(body.messages)]
    try:
        return state.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=True,
            continue_final_message=body.continue_final_message)
    except (ValueError, TypeError, jinja2.TemplateError) as error:
        raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from error


async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
    state: ServerState = request.app.state.server
    check_request(body, state.config)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    check_token_ids(body.stop_token_ids or [], state.vocab_size, "stop_token_ids")
    prompt_ids = chat_prompt_ids(state, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(max_tokens, len(prompt_ids), state.max_sequence_length, "messages")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=top_logprobs)
    writer = ChatWriter(state, f"chatcmpl-{uuid.uuid4().hex}", top_logprobs)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await generation.respond(request, state, prompt_ids, params, writer, stream=body.stream,
                                    include_usage=include_usage)


class ChatWriter(ResponseWriter):
    chunk_object = "chat.completion.chunk"

    def __init__(self, state: ServerState, request_id: str, top_logprobs: int | None):
        super().__init__(state, request_id)
        self.top_logprobs = top_logprobs

    def _logprobs(self, token_ids, positions) -> ChatChoiceLogprobs | None:
        if self.top_logprobs is None or positions is None:
            return None
        return ChatChoiceLogprobs(content=chat_logprobs(token_ids, positions, self.top_logprobs, self.state.token_text))

    def completion(self, output: RequestOutput) -> ChatCompletion:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=self._logprobs(c.token_ids, c.logprobs), finish_reason=c.finish_reason)
                   for c in output.outputs]
        return ChatCompletion(id=self.request_id, created=self.created, model=self.model, choices=choices,
                              usage=Usage.of(output))

    def opening(self, n: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    def delta_choice(self, delta: Delta) -> dict:
        content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
        logprobs = self._logprobs(delta.token_ids, delta.logprobs)
        return {"index": delta.index, "delta": content, "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": delta.finish_reason}
