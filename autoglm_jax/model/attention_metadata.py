"""Per-step attention metadata: how the flat (ragged) token batch maps onto sequences and pages.

Owns: the arrays the attention dispatch and the kernels need to place and read K/V. Built on the
host by the runner (``engine.runner``) or by ``AttentionMetadata.for_single_sequence``; every shape
is static within a bucket:

    T  = token bucket (flat tokens of all sequences in this step, padding at the end)
    B  = sequence bucket (rows of the page table)
    MP = max pages per sequence (page-table width bucket)

Padding tokens have ``slot_mapping`` inside the scratch page 0, ``seq_ids`` 0 and position 0;
padding sequence rows have ``context_lens`` 0 and ``query_start_loc`` equal to the total.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    seq_ids: jax.Array          # [T] int32: batch row of each token
    positions: jax.Array        # [T] int32: position of each token in its sequence
    slot_mapping: jax.Array     # [T] int32: page * page_size + row where the token's K/V is written
    page_table: jax.Array       # [B, MP] int32: pages of each sequence, in order (0 = unused)
    context_lens: jax.Array     # [B] int32: tokens in the cache for each sequence after this step
    query_start_loc: jax.Array  # [B + 1] int32: sequence b owns flat tokens [qsl[b], qsl[b+1])
    num_tokens: jax.Array       # [] int32: real (non-padding) tokens in this step
    # Static: every token is its sequence's single decode token (T == B, token b of row b), as in the
    # runner's decode loop; attention kernels then stream one sequence per CTA.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def token_bucket(self) -> int:
        return self.seq_ids.shape[0]

    @property
    def max_context(self) -> int:
        """Largest context a sequence can have in this bucket (MP * page_size needs the page size)."""
        return self.page_table.shape[1]

    @classmethod
    def build(
        cls,
        seq_lens_before: np.ndarray,
        query_lens: np.ndarray,
        page_table: np.ndarray,
        page_size: int,
        token_bucket: int,
    ) -> "AttentionMetadata":
        """Host-side construction for a batch of sequences (numpy in, device arrays out).

        seq_lens_before[b]: tokens of sequence b already in the cache; query_lens[b]: new tokens of
        sequence b in this step (0 for padding rows); page_table: [B, MP] with enough pages for
        seq_lens_before + query_lens. Tokens are laid out sequence after sequence.
        """
        seq_lens_before = np.asarray(seq_lens_before, np.int32)
        query_lens = np.asarray(query_lens, np.int32)
        page_table = np.asarray(page_table, np.int32)
        total = int(query_lens.sum())
        if total > token_bucket:
            raise ValueError(f"{total} tokens do not fit token_bucket={token_bucket}")
        num_seqs = len(query_lens)
        qsl = np.zeros(num_seqs + 1, np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        seq_ids = np.zeros(token_bucket, np.int32)
        positions = np.zeros(token_bucket, np.int32)
        seq_ids[:total] = np.repeat(np.arange(num_seqs, dtype=np.int32), query_lens)
        positions[:total] = np.repeat(seq_lens_before - qsl[:-1], query_lens) + np.arange(total, dtype=np.int32)
        slots = np.zeros(token_bucket, np.int32)  # padding -> scratch page 0
        pages = page_table[seq_ids[:total], positions[:total] // page_size]
        slots[:total] = pages * page_size + positions[:total] % page_size
        return cls(
            seq_ids=jnp.asarray(seq_ids),
            positions=jnp.asarray(positions),
            slot_mapping=jnp.asarray(slots),
            page_table=jnp.asarray(page_table),
            context_lens=jnp.asarray(seq_lens_before + query_lens),
            query_start_loc=jnp.asarray(qsl),
            num_tokens=jnp.asarray(total, jnp.int32),
        )
