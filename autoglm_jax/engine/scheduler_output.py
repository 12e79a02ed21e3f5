"""What one scheduling step tells the runner to do.

Owns: the immutable hand-off from ``engine.scheduler`` to ``engine.runner``. It does not own how the
runner turns it into device arrays (``model.attention_metadata.AttentionMetadata.build``).

For each scheduled sequence the runner feeds ``token_ids`` at positions ``start_position ..
start_position + len(token_ids) - 1`` writing K/V into ``page_ids`` (all pages of the sequence, in
position order; pad the page-table row with page 0, the scratch page). If ``sample`` is True the
step reaches the end of the sequence's known tokens and the runner samples a token for it; with
multi-step decoding it may then feed that token back and sample again, up to
``num_lookahead_tokens`` more times (pages for those positions are already in ``page_ids``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


class ScheduledSequence(NamedTuple):
    """One sequence's share of a step (a named tuple: immutable, and cheap to build for every running
    sequence every step)."""

    request_id: str
    slot: int                     # batch row in [0, max_batch_size) for per-row sampling state
    token_ids: tuple[int, ...]    # new tokens fed this step: a prompt chunk, or the last sampled token
    start_position: int           # = num_computed_tokens before the step
    page_ids: tuple[int, ...]     # all pages of the sequence, enough for every position written
    sample: bool                  # True iff this step reaches the end of the known tokens
    is_new: bool                  # first chunk after (re)admission: reset the slot's sampling state
    is_decode: bool               # one already-generated token fed back (not a prompt chunk)
    num_lookahead_tokens: int = 0  # extra decode steps this row may take in the same call (<= requested)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_position(self) -> int:
        """Tokens in the cache for this sequence after the step (before lookahead)."""
        return self.start_position + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSequence, ...]  # decodes first, then prefill chunks
    preempted: tuple[str, ...] = ()            # request ids preempted this step (their slots are free)
    finished: tuple[str, ...] = ()             # request ids the scheduler finished with FinishReason.ERROR
    num_lookahead_tokens: int = 0              # as passed to schedule()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.scheduled if seq.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.scheduled if not seq.is_decode)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
