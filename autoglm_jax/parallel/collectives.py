"""The tensor-parallel collectives the model calls from inside ``shard_map`` (no-ops without an axis).

Owns: the three places a TP shard talks to the others — the all-reduce after a row-parallel
projection (attention output, MLP down), the vocab-parallel embedding lookup, and the all-gather of
vocab-parallel logits. Each takes ``axis`` = the mesh axis name, or None on one device (identity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def all_reduce(x: jax.Array, axis: str | None) -> jax.Array:
    """Sum of the shards' partial results x [..., H] (one all-reduce); x itself when axis is None."""
    return x if axis is None else jax.lax.psum(x, axis)


def vocab_parallel_embed(table: jax.Array, token_ids: jax.Array, vocab_size: int, axis: str | None) -> jax.Array:
    """Rows of the embedding for token_ids [T] -> [T, H].

    table is this shard's [V / tp, H] slice (rows ``shard * V/tp ...``) under TP, or the whole [V, H]
    table: each shard looks up the ids it owns, zeros the rest, and one psum assembles the rows.
    """
    local = table.shape[0]
    if axis is None or local == vocab_size:
        return jnp.take(table, token_ids, axis=0)
    index = token_ids - jax.lax.axis_index(axis) * local
    owned = (index >= 0) & (index < local)
    rows = jnp.take(table, jnp.clip(index, 0, local - 1), axis=0)
    return jax.lax.psum(jnp.where(owned[:, None], rows, jnp.zeros((), rows.dtype)), axis)


def gather_vocab(logits: jax.Array, vocab_size: int, axis: str | None) -> jax.Array:
    """Logits [S, V / tp] of this shard's vocab slice -> the full [S, V] on every shard."""
    if axis is None or logits.shape[-1] == vocab_size:
        return logits
    return jax.lax.all_gather(logits, axis, axis=logits.ndim - 1, tiled=True)
