"""Device-resident serving state that every step reads and rewrites (donated, updated in place).

Owns: the KV page pools and the per-slot penalty state of the sampler. Slots are the scheduler's
persistent batch rows; a slot index equal to ``num_slots`` means "no slot" and is dropped by scatters.

    kv.k, kv.v      [L, num_pages, page_size, Nkv, D]
    output_counts   [num_slots, V] int32: how often each token was generated (frequency/presence)
    prompt_mask     [num_slots, V] bool:  tokens of the prompt (repetition penalty)

Also the helpers of ``slot_tokens`` [num_slots] int32, the last token each slot sampled: every step
returns it and the next takes it as an input (async scheduling feeds a token still on the device
from it). It is an input/output of the steps rather than a DeviceState field, so the donated state
and its tensor-parallel partition specs keep their layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.kv_cache import KVCache

TOKEN_NOT_COUNTED, TOKEN_PROMPT, TOKEN_OUTPUT = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceState:
    kv: KVCache
    output_counts: jax.Array
    prompt_mask: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, num_pages: int, page_size: int, num_slots: int, dtype) -> "DeviceState":
        kv = KVCache.create(config, num_pages, page_size, dtype)
        counts = jnp.zeros((num_slots, config.vocab_size), jnp.int32)
        mask = jnp.zeros((num_slots, config.vocab_size), bool)
        return cls(kv=kv, output_counts=counts, prompt_mask=mask)

    @staticmethod
    def slot_state_bytes(config: ModelConfig, num_slots: int) -> int:
        return num_slots * config.vocab_size * 5


def record_step_tokens(state: DeviceState, token_ids, token_kind, token_slots, reset_slots) -> DeviceState:
    """Clears ``reset_slots`` [B] (rows starting afresh), then marks this step's prompt tokens in
    prompt_mask and counts re-fed output tokens (recompute after preemption) in output_counts.

    token_ids, token_kind, token_slots: [T]; token_kind is TOKEN_NOT_COUNTED / TOKEN_PROMPT / TOKEN_OUTPUT.
    """
    num_slots = state.output_counts.shape[0]
    counts = state.output_counts.at[reset_slots].set(0, mode="drop")
    mask = state.prompt_mask.at[reset_slots].set(False, mode="drop")
    prompt_slots = jnp.where(token_kind == TOKEN_PROMPT, token_slots, num_slots)
    mask = mask.at[prompt_slots, token_ids].set(True, mode="drop")
    output_slots = jnp.where(token_kind == TOKEN_OUTPUT, token_slots, num_slots)
    counts = counts.at[output_slots, token_ids].add(1, mode="drop")
    return DeviceState(kv=state.kv, output_counts=counts, prompt_mask=mask)


def count_sampled(state: DeviceState, slots, token_ids, valid) -> DeviceState:
    """output_counts[slots[b], token_ids[b]] += 1 where valid[b]."""
    num_slots = state.output_counts.shape[0]
    slots = jnp.where(valid, slots, num_slots)
    counts = state.output_counts.at[slots, token_ids].add(1, mode="drop")
    return DeviceState(kv=state.kv, output_counts=counts, prompt_mask=state.prompt_mask)


def slot_rows(state: DeviceState, slots):
    """(output_counts, prompt_mask) rows [B, V] of ``slots`` [B] (out-of-range slots read zeros)."""
    num_slots = state.output_counts.shape[0]
    valid = (slots >= 0) & (slots < num_slots)
    clamped = jnp.clip(slots, 0, num_slots - 1)
    counts = jnp.where(valid[:, None], state.output_counts[clamped], 0)
    mask = jnp.where(valid[:, None], state.prompt_mask[clamped], False)
    return counts, mask


def feed_tokens(token_ids, slot_tokens, slots):
    """token_ids [B] with each negative entry replaced by ``slot_tokens[slots[b]]`` (the token the
    previous step sampled for that slot, never read back to the host)."""
    num_slots = slot_tokens.shape[0]
    return jnp.where(token_ids >= 0, token_ids, slot_tokens[jnp.clip(slots, 0, num_slots - 1)])


def record_slot_tokens(slot_tokens, slots, token_ids, valid):
    """slot_tokens [num_slots] with slot_tokens[slots[b]] = token_ids[b] where valid[b]."""
    num_slots = slot_tokens.shape[0]
    return slot_tokens.at[jnp.where(valid, slots, num_slots)].set(token_ids, mode="drop")
