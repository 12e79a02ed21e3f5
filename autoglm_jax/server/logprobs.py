"""Engine logprobs (vLLM's ``{token_id: Logprob}`` per position) in OpenAI's two formats.

Owns: chat's ``logprobs.content`` entries (token, logprob, bytes, top_logprobs) and legacy
completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset). Logprobs of -inf
are clamped to -9999.0, as vLLM does, because JSON has no infinity. It does not own which positions
are new in a stream (``streaming.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from autoglm_jax.outputs import Logprob
from autoglm_jax.server.responses import CompletionLogprobs, TokenLogprob, TopLogprob

MIN_LOGPROB = -9999.0
TokenText = Callable[[int], str]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def _text(token_id: int, entry: Logprob, token_text: TokenText) -> str:
    return entry.decoded_token if entry.decoded_token is not None else token_text(token_id)


def _top(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k best entries of one position, best first (the sampled token is among them only if ranked <= k)."""
    ranked = sorted((item for item in position.items() if item[1].rank is not None and item[1].rank <= k),
                    key=lambda item: item[1].rank)
    return ranked[:k]


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[dict[int, Logprob]], top_k: int,
                  token_text: TokenText) -> list[TokenLogprob]:
    """token_ids[i] was sampled at positions[i] (same length); top_k: entries in ``top_logprobs``."""
    entries = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        text = _text(token_id, chosen, token_text)
        top = [TopLogprob(token=(t := _text(i, e, token_text)), logprob=_finite(e.logprob), bytes=list(t.encode()))
               for i, e in _top(position, top_k)]
        entries.append(TokenLogprob(token=text, logprob=_finite(chosen.logprob), bytes=list(text.encode()),
                                    top_logprobs=top))
    return entries


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[dict[int, Logprob]], top_k: int,
                        token_text: TokenText, text_offset: int = 0) -> CompletionLogprobs:
    """Legacy format; ``text_offset`` is where the first token's text starts in the choice's text."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        text = _text(token_id, chosen, token_text)
        tokens.append(text)
        values.append(_finite(chosen.logprob))
        tops.append({_text(i, e, token_text): _finite(e.logprob) for i, e in _top(position, top_k)})
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
