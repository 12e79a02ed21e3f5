"""Request bodies of the OpenAI API (pydantic), with OpenAI's names, defaults and ranges.

Owns: the shapes and per-field ranges of ``POST /v1/chat/completions`` and ``POST /v1/completions``
(plus vLLM's extra sampling fields: top_k, min_p, repetition_penalty, min_tokens, ...). A field out of
range fails validation, which the server answers with 400. It does not own cross-field and
model-dependent checks (``sampling.py``: length vs the model, n vs greedy) nor responses
(``responses.py``). Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# eos + stop_token_ids must fit the engine's on-device stop list (runner.STOP_IDS_WIDTH = 16) and a
# sampler stop-list width that warm-up compiled; a longer list would silently lose stops or recompile.
MAX_STOP_TOKEN_IDS = 8

Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
PositiveCount = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(BaseModel):
    """One part of a message's content: ``{"type": "text", "text": ...}``; other types (image_url,
    input_audio, file, ...) are accepted by the schema and refused by the text-only model with a 400."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class SamplingFields(_Body):
    """Sampling fields shared by chat and completions (OpenAI names, then vLLM's extras)."""

    model: str | None = Field(None, description="must equal the served model name (404 otherwise); None = it")
    n: PositiveCount = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Name a color."}],
        "max_tokens": 4, "temperature": 0.0, "top_p": 0.85, "frequency_penalty": 0.2}]})
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveCount | None = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: PositiveCount | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4,
        "temperature": 0.7, "seed": 1, "logprobs": 2, "stop": ["\n"]}]})
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[str], Field(min_length=1)] | Annotated[list[list[TokenId]], Field(min_length=1)])
    max_tokens: PositiveCount | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveCount | None = None
