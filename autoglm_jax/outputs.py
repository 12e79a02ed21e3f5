"""Result types handed back to users, shaped as vLLM's (``vllm/outputs.py``, ``vllm/logprobs.py``).

Owns: ``Logprob``, ``CompletionOutput``, ``RequestOutput`` and the host helper that turns one row
of the sampler's logprob arrays into vLLM's ``{token_id: Logprob}`` dict. It does not own computing
logprobs (``autoglm_jax.sampler``), text (the detokenizer) or when a request finishes
(``autoglm_jax.stop_checker``).

Logprob containers (as vLLM):
  - ``SampleLogprobs``: one dict per generated token; each dict holds the sampled token plus the
    top-N tokens (so N or N + 1 entries).
  - ``PromptLogprobs``: ``None`` for prompt position 0 (nothing predicts it), then one dict per
    prompt token holding the actual prompt token plus the top-N.
Ranks are 1-based: rank r means r tokens have a logprob >= this one (ties count as ahead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Logprob:
    """Log probability of one token. rank: 1-based rank in the vocabulary (None if unknown)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


def make_logprob_dict(
    token_id: int,
    logprob: float,
    rank: int,
    top_token_ids: Sequence[int],
    top_logprobs: Sequence[float],
    decode: Callable[[int], str] | None = None,
) -> dict[int, Logprob]:
    """vLLM's per-position dict: the chosen token first, then the top-N with ranks 1..N.

    token_id / logprob / rank: the sampled (or actual prompt) token; top_token_ids / top_logprobs:
    [N] sorted by logprob, descending. When the chosen token is among the top-N, its top-N entry
    (rank = position + 1) replaces the first one, as in vLLM. decode: token id -> text, for
    ``decoded_token`` (None leaves it unset).
    """
    if len(top_token_ids) != len(top_logprobs):
        raise ValueError(
            f"top_token_ids ({len(top_token_ids)}) and top_logprobs ({len(top_logprobs)}) differ in length")
    ids = [int(token_id), *(int(t) for t in top_token_ids)]
    values = [float(logprob), *(float(v) for v in top_logprobs)]
    ranks = [int(rank), *range(1, len(top_token_ids) + 1)]
    return {
        tid: Logprob(logprob=value, rank=r, decoded_token=decode(tid) if decode is not None else None)
        for tid, value, r in zip(ids, values, ranks)
    }


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request.

    index: which of the request's n outputs. token_ids: generated ids (the stop token included when a
    stop token ended it, as vLLM). cumulative_logprob: sum of the sampled tokens' logprobs (None when
    logprobs were not requested). logprobs: SampleLogprobs or None. finish_reason: None while
    running, "stop" or "length" (or "abort"). stop_reason: the stop token id or stop string that
    ended it, None for EOS / length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """Everything a request has produced so far (or its final state when ``finished``).

    prompt: the prompt text (None when the request came as token ids). prompt_logprobs:
    PromptLogprobs or None. outputs: one CompletionOutput per sample (n of them). metrics: engine
    timing statistics, if collected.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None
