"""The scheduler's working state for one step: what is scheduled so far and what budget is left.

Owns: token-budget accounting (total budget and the prefill share) and the growing list of
``ScheduledSequence`` entries, including taking an entry back when its request is preempted later
in the same step. It does not decide what to schedule (``engine.scheduler``).
"""

from __future__ import annotations

from autoglm_jax.engine.scheduler_config import SchedulerConfig
from autoglm_jax.engine.scheduler_output import ScheduledSequence, SchedulerOutput


class StepPlan:
    """Mutable builder of one ``SchedulerOutput``."""

    def __init__(self, config: SchedulerConfig, num_lookahead_tokens: int):
        self._token_budget = config.max_num_batched_tokens
        self._prefill_tokens_with_decodes = config.prefill_tokens_with_decodes
        self.num_lookahead_tokens = num_lookahead_tokens
        self._entries: dict[str, ScheduledSequence] = {}
        self.preempted: list[str] = []
        self.finished: list[str] = []
        # running totals (O(1) budget queries: the scheduler asks once per running request)
        self.num_decode_tokens = 0
        self.num_prefill_tokens = 0

    def _count(self, entry: ScheduledSequence, sign: int) -> None:
        if entry.is_decode:
            self.num_decode_tokens += sign * entry.num_tokens
        else:
            self.num_prefill_tokens += sign * entry.num_tokens

    def decode_tokens_left(self) -> int:
        return self._token_budget - self.num_decode_tokens - self.num_prefill_tokens

    def prefill_tokens_left(self) -> int:
        """Prefill tokens still allowed: with decodes their share widened to the step's bucket
        (``SchedulerConfig.prefill_tokens_with_decodes``), else the whole budget."""
        decode, prefill, budget = self.num_decode_tokens, self.num_prefill_tokens, self._token_budget
        cap = self._prefill_tokens_with_decodes(decode) if decode > 0 else budget
        return max(0, min(budget - decode - prefill, cap - prefill))

    def add(self, entry: ScheduledSequence) -> None:
        if entry.request_id in self._entries:
            raise RuntimeError(f"request {entry.request_id!r} scheduled twice in one step")
        self._entries[entry.request_id] = entry
        self._count(entry, +1)

    def withdraw(self, request_id: str) -> None:
        """Drop the request's entry, if any (its request was preempted later in the step)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._count(entry, -1)

    def build(self) -> SchedulerOutput:
        entries = list(self._entries.values())
        ordered = [e for e in entries if e.is_decode] + [e for e in entries if not e.is_decode]
        return SchedulerOutput(
            scheduled=tuple(ordered),
            preempted=tuple(self.preempted),
            finished=tuple(self.finished),
            num_lookahead_tokens=self.num_lookahead_tokens,
        )
