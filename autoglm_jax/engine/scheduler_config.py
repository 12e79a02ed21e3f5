"""Settings of the continuous-batching scheduler.

Owns: the static limits one scheduling step obeys, validated once. It does not own the policy that
applies them (``engine.scheduler``) nor KV-pool sizing (``engine.page_allocator``).
"""

from __future__ import annotations

import dataclasses
import functools

from autoglm_jax.engine.buckets import BucketLadder


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step.

    max_batch_size: sequences running at once; also the number of batch slots (rows) the runner keeps
        per-sequence sampling state in.
    max_num_batched_tokens: tokens fed to the model in one step (decodes + prefill chunks).
    page_size: tokens per KV page (must equal the allocator's).
    max_sequence_length: most tokens (prompt + output) a sequence may have; prompts must be shorter
        so at least one token can be generated.
    prefill_ratio: share of ``max_num_batched_tokens`` prefill may take in a step that also has
        decodes (decodes are scheduled first); a step without decodes may prefill with the whole budget.
    enable_chunked_prefill: split long prompts over steps; when False a prompt is prefilled in one
        step, so ``max_num_batched_tokens`` must be >= ``max_sequence_length``.
    max_prefill_chunk_tokens: optional cap on one sequence's prefill chunk per step (vLLM's
        ``long_prefill_token_threshold``), so several prompts share a step; None = no cap.
    use_dynamic_batching: True = continuous batching (admit whenever there is room); False = static
        batching: when nothing runs, the first min(max_batch_size, waiting) requests of the queue form a
        batch; its members are admitted over as many steps as their prefills need (those admitted may
        decode meanwhile; later arrivals wait), and the batch runs to completion (every member finished
        or aborted) before the next forms.
    """

    max_batch_size: int
    max_num_batched_tokens: int
    page_size: int
    max_sequence_length: int
    prefill_ratio: float = 0.5
    enable_chunked_prefill: bool = True
    max_prefill_chunk_tokens: int | None = None
    use_dynamic_batching: bool = True

    def __post_init__(self):
        for name in ("max_batch_size", "max_num_batched_tokens", "page_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name}={value!r} must be an int >= 1")
        if self.max_sequence_length < 2:
            raise ValueError(
                f"SchedulerConfig.max_sequence_length={self.max_sequence_length} must be >= 2 "
                "(a prompt of at least one token plus one generated token)"
            )
        if not 0.0 < self.prefill_ratio <= 1.0:
            raise ValueError(f"SchedulerConfig.prefill_ratio={self.prefill_ratio!r} must be in (0, 1]")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                f"max_batch_size={self.max_batch_size} so every running sequence can decode each step"
            )
        if self.max_prefill_chunk_tokens is not None:
            if not isinstance(self.max_prefill_chunk_tokens, int) or self.max_prefill_chunk_tokens < 1:
                raise ValueError(
                    f"SchedulerConfig.max_prefill_chunk_tokens={self.max_prefill_chunk_tokens!r} "
                    "must be None or an int >= 1"
                )
            if not self.enable_chunked_prefill:
                raise ValueError(
                    f"SchedulerConfig.max_prefill_chunk_tokens={self.max_prefill_chunk_tokens} needs "
                    "enable_chunked_prefill=True"
                )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_sequence_length:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens={self.max_num_batched_tokens} must be "
                f">= max_sequence_length={self.max_sequence_length} (a whole sequence is re-prefilled "
                "in one step after preemption)"
            )

    @property
    def max_pages_per_sequence(self) -> int:
        """Page-table width that holds the longest sequence: ceil(max_sequence_length / page_size)."""
        return -(-self.max_sequence_length // self.page_size)

    @property
    def prefill_token_cap(self) -> int:
        """The prefill share of a step that also decodes: floor(prefill_ratio * budget), >= 1."""
        return max(1, int(self.prefill_ratio * self.max_num_batched_tokens))

    def prefill_tokens_with_decodes(self, num_decode_tokens: int) -> int:
        """Prefill tokens a step with ``num_decode_tokens`` (>= 1) decodes may take: the prefill share widened
        to the token bucket the step is padded to anyway, ``token_bucket(decodes + share) - decodes`` (every
        GEMM runs the padded rows, so prefill fills the padding for free). E.g. budget 2,048, prefill_ratio
        0.8, 216 decodes: 216 + 1,638 pads to 2,048, so 1,832 prefill tokens."""
        total = min(self.max_num_batched_tokens, num_decode_tokens + self.prefill_token_cap)
        return self._ladder.token_bucket(total) - num_decode_tokens

    @functools.cached_property
    def _ladder(self) -> BucketLadder:  # the runner's buckets for these limits (built once: asked every step)
        return BucketLadder(self.max_batch_size, self.max_num_batched_tokens)
