"""Test helper: run our model over one sequence with a contiguous page table (no engine)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache

PAGE_SIZE = 8


def new_cache(config, max_len, dtype=jnp.float32, page_size=PAGE_SIZE):
    pages = -(-max_len // page_size)
    return KVCache.create(config, pages + 1, page_size, dtype), np.arange(1, pages + 1, dtype=np.int32)[None]


def forward(model, tokens, start, cache, page_table, page_size=PAGE_SIZE, bucket=None):
    """Logits [len(tokens), V] for tokens at positions start.. of sequence 0."""
    tokens = np.asarray(tokens, np.int32)
    bucket = bucket or len(tokens)
    md = AttentionMetadata.build([start], [len(tokens)], page_table, page_size, bucket)
    padded = np.zeros(bucket, np.int32)
    padded[: len(tokens)] = tokens
    logits, cache = model(jnp.asarray(padded), cache, md)
    return np.asarray(logits[: len(tokens)]), cache
