"""One generation request as the host-side engine tracks it.

Owns: the request's tokens (prompt + generated), its life-cycle status, the KV pages and batch slot
it holds while running, and the timestamps metrics are computed from. It does not own the policy
that changes those fields (``engine.scheduler``), sampling (the runner) or detokenization.

One ``Request`` is one sequence. ``sampling_params`` is opaque here: the scheduler reads only
``max_tokens`` (``None`` = up to the model's ``max_sequence_length``); a request with ``n > 1`` is
fanned out by the engine into ``n`` Requests with their own ids before it reaches the scheduler.

Token bookkeeping (all counts in tokens):
    all_token_ids       = prompt_token_ids + output_token_ids        (length num_tokens)
    num_computed_tokens = tokens whose K/V are in the cache; always <= num_tokens. While decoding
                          it is num_tokens - 1 (the last sampled token is fed in the next step).
Preemption by recompute drops the pages and sets num_computed_tokens to 0; the outputs are kept and
re-prefilled together with the prompt when the request is admitted again.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, outputs kept, pages dropped
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self._value_.startswith("finished_")  # _value_, not .name: asked per request per step


class FinishReason(enum.Enum):
    """Why a request ended; the values are the OpenAI API's ``finish_reason`` strings."""

    STOP = "stop"      # a stop token / stop string (decided by the engine)
    LENGTH = "length"  # max_tokens or max_sequence_length reached (decided by the scheduler)
    ABORT = "abort"    # the client went away or cancelled
    ERROR = "error"    # the request can never fit the KV pool; see Request.error_message

    @property
    def status(self) -> RequestStatus:
        return _STATUS_OF_REASON[self]


_STATUS_OF_REASON = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}


@dataclasses.dataclass(eq=False)  # identity equality: two requests are never "the same" by value
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: Any  # opaque; must have .max_tokens (int >= 1 or None) and .n
    arrival_time: float   # seconds on the engine's clock (time.monotonic by default)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)  # KV pages, in position order
    slot: int | None = None  # batch row in [0, max_batch_size) while RUNNING, else None
    finish_reason: FinishReason | None = None
    error_message: str | None = None
    num_preemptions: int = 0

    # Timing (engine clock, seconds); None until the event happens.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self):
        self.prompt_token_ids = tuple(int(t) for t in self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_between(self, start: int, end: int) -> tuple[int, ...]:
        """all_token_ids[start:end] without building the whole history (called per request per step)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        outputs = tuple(self.output_token_ids[max(start - num_prompt, 0) : end - num_prompt])
        return self.prompt_token_ids[start:] + outputs if start < num_prompt else outputs

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        """Prompt followed by outputs: what a re-prefill after preemption feeds."""
        return self.prompt_token_ids + tuple(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose K/V are not yet in the cache (1 while decoding)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
