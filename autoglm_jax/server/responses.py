"""Response bodies in OpenAI's exact shapes: full responses (pydantic, so the OpenAPI schema lists them)
and streaming chunks (plain dicts, so ``null`` fields appear exactly where OpenAI puts them).

Owns: ``chat.completion`` / ``chat.completion.chunk`` / ``text_completion`` objects, ``usage``, the
model list, and the SSE framing (``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``). It does not own
turning engine outputs into deltas or logprobs (``streaming.py``, ``logprobs.py``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from autoglm_jax.outputs import RequestOutput

SSE_DONE = "data: [DONE]\n\n"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, output: RequestOutput) -> "Usage":
        """Counts of the prompt and of every generated token (all n choices; a stop token counts)."""
        prompt = len(output.prompt_token_ids)
        completion = sum(len(choice.token_ids) for choice in output.outputs)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm-jax"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


# ---- streaming chunks ---------------------------------------------------------------------------
def chunk(kind: Literal["chat.completion.chunk", "text_completion"], request_id: str, created: int, model: str,
          choices: list[dict[str, Any]], *, include_usage: bool, usage: Usage | None = None) -> dict[str, Any]:
    """One streamed object. With ``include_usage`` every chunk carries ``"usage": null`` except the
    last one, which has ``choices: []`` and the usage (OpenAI's ``stream_options`` contract)."""
    body: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": model,
                            "system_fingerprint": None, "choices": choices}
    if include_usage:
        body["usage"] = usage.model_dump() if usage is not None else None
    return body


def sse(data: dict[str, Any]) -> str:
    """One server-sent event; ``allow_nan=False`` because JSON has no NaN (logprobs are clamped)."""
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"
