"""From a validated request body to ``SamplingParams``: the checks that need the model or several fields.

Owns: the served-model check (404), unsupported OpenAI features (400 naming them), ``n`` against the
server's limit, ``stream_options`` without ``stream``, and prompt + max_tokens against the model's
context length (400 with OpenAI's wording); then ``SamplingParams`` (whose own ValueErrors become
400s). It does not own per-field ranges (``protocol.py``) nor building prompts (``chat.py``,
``completions.py``).
"""

from __future__ import annotations

from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.server.config import ServerConfig
from autoglm_jax.server.errors import APIError
from autoglm_jax.server.protocol import SamplingFields


def check_request(body: SamplingFields, config: ServerConfig) -> None:
    """Checks that do not need the prompt: model name, n, features this server does not implement."""
    if body.model is not None and body.model != config.served_model_name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                            f"`{config.served_model_name}`.", param="model", code="model_not_found")
    if body.n > config.max_n:
        raise APIError(400, f"n={body.n} exceeds this server's limit of {config.max_n}", param="n")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def resolve_max_tokens(max_tokens: int | None, num_prompt_tokens: int, max_sequence_length: int,
                       prompt_name: str) -> int:
    """max_tokens, defaulting to the room the context leaves; 400 if prompt + max_tokens do not fit."""
    room = max_sequence_length - num_prompt_tokens
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_sequence_length} tokens. However, your "
                            f"{prompt_name} has {num_prompt_tokens} tokens, which leaves no room for a completion. "
                            f"Please reduce the length of the {prompt_name}.", param=prompt_name,
                       code="context_length_exceeded")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {max_sequence_length} tokens. However, you "
                            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                            f"{prompt_name}, {max_tokens} in the completion). Please reduce the length of the "
                            f"{prompt_name} or the completion.", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def sampling_params(body: SamplingFields, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """OpenAI defaults (temperature 1, top_p 1, penalties 0) for fields the request left out."""
    fields = dict(
        n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, max_tokens=max_tokens,
        stop=body.stop, logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        top_k=-1 if body.top_k is None else body.top_k, min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, stop_token_ids=body.stop_token_ids,
        skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
    )
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as error:
        raise APIError(400, str(error)) from error


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """400 naming the first ids outside the model's vocabulary (the engine would reject or mis-handle them)."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{param} contains token ids {bad[:5]} outside the vocabulary [0, {vocab_size})",
                       param=param)
