"""The two jitted computations of serving: one mixed prefill+decode step, and a multi-step decode loop.

Owns: what happens on the device between host decisions — model forward, sampling, penalty-state
updates and, in the decode loop, on-device stop checks. Inputs are pytrees of arrays with bucketed
static shapes (see ``engine.buckets``); the only static arguments are the model graph, the number
of top logprobs and the loop's maximum length. Host-side assembly is in ``engine.runner``.
Both return ``slot_tokens``, each slot's last sampled token, which the next step takes as an input:
a decode row whose token id is negative feeds it (async scheduling: the token never visits the host).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from autoglm_jax.engine.device_state import (DeviceState, count_sampled, feed_tokens, record_slot_tokens,
                                             record_step_tokens, slot_rows)
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.sampler import SamplerOutput, SamplingTensors, gather_logprobs, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """One mixed step over T flat tokens and B rows (sequences)."""

    token_ids: jax.Array        # [T] int32 (< 0: PENDING_TOKEN, the row slot's last sampled token)
    token_kind: jax.Array       # [T] int32: device_state.TOKEN_* (which penalty state a token feeds)
    md: AttentionMetadata       # token -> sequence/page mapping
    logits_indices: jax.Array   # [B] int32: flat index of each row's last token
    row_slots: jax.Array        # [B] int32: slot of each row (num_slots for padding rows)
    reset_slots: jax.Array      # [B] int32: slot to clear before this step (num_slots = none)
    sample_rows: jax.Array      # [B] bool: rows whose sampled token is real (end of known tokens)
    sampling: SamplingTensors   # [B] rows
    prompt_next_ids: jax.Array  # [T] int32: the prompt token after each token (-1: none/not wanted)
    want_prompt_logprobs: jax.Array  # [] bool
    slot_tokens: jax.Array      # [S] int32: last sampled token per slot (the previous step's output)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    sampled: SamplerOutput        # [B] rows
    prompt_logprob: jax.Array     # [T] f32 logprob of prompt_next_ids[t] after token t
    prompt_rank: jax.Array        # [T] int32
    prompt_top: jax.Array         # [T, N] f32
    prompt_top_ids: jax.Array     # [T, N] int32
    slot_tokens: jax.Array        # [S] int32: the input's, with each sampling row's token at its slot


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInput:
    """Up to K decode steps for B rows; row b feeds token_ids[b] at positions[b], then its samples."""

    token_ids: jax.Array   # [B] int32: the last sampled token of each row; < 0 = slot_tokens[row_slots[b]]
    positions: jax.Array   # [B] int32: its position
    page_table: jax.Array  # [B, MP] int32 with pages for positions + max_new - 1
    row_slots: jax.Array   # [B] int32
    sampling: SamplingTensors  # [B]; its ``step`` is the row's generated count before the call
    max_new: jax.Array     # [B] int32: most tokens the row may generate in this call (0 = padding)
    stop_ids: jax.Array    # [B, S] int32: tokens that end the row on device (-1 padding)
    num_steps: jax.Array   # [] int32: loop bound <= the static maximum
    slot_tokens: jax.Array  # [S] int32: last sampled token per slot (the previous step's output)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    token_ids: jax.Array      # [K, B] int32
    logprob: jax.Array        # [K, B] f32
    rank: jax.Array           # [K, B] int32
    top_logprobs: jax.Array   # [K, B, N] f32
    top_token_ids: jax.Array  # [K, B, N] int32
    num_generated: jax.Array  # [B] int32: valid entries of each row
    slot_tokens: jax.Array    # [S] int32: the input's, with each row's last sampled token at its slot


def mixed_step(graphdef, params, state: DeviceState, inp: StepInput, *, num_logprobs: int):
    """Forward all T tokens, sample one token per row. Returns (new state, StepOutput). A negative token
    id (``scheduler.PENDING_TOKEN``: a decode planned before the previous step's tokens were read) is
    that row's slot's last sampled token, taken from ``inp.slot_tokens``."""
    model = nnx.merge(graphdef, params)
    token_slots = inp.row_slots[inp.md.seq_ids]
    token_ids = feed_tokens(inp.token_ids, inp.slot_tokens, token_slots)
    state = record_step_tokens(state, token_ids, inp.token_kind, token_slots, inp.reset_slots)
    hidden, kv = model.hidden_states(token_ids, state.kv, inp.md)
    state = dataclasses.replace(state, kv=kv)
    logits = model.logits(hidden[inp.logits_indices])
    counts, mask = slot_rows(state, inp.row_slots)
    sampled = sample(logits, inp.sampling, counts, mask, num_logprobs)
    state = count_sampled(state, inp.row_slots, sampled.token_ids, inp.sample_rows)
    prompt = _prompt_logprobs(model, hidden, inp, num_logprobs)
    slot_tokens = record_slot_tokens(inp.slot_tokens, inp.row_slots, sampled.token_ids, inp.sample_rows)
    return state, StepOutput(sampled, *prompt, slot_tokens=slot_tokens)


PROMPT_LOGPROBS_CHUNK = 256  # tokens whose full-vocabulary logprobs exist at once


def _prompt_logprobs(model, hidden, inp: StepInput, num_logprobs: int):
    """Logprobs of each next prompt token over all T positions; skipped (zeros) unless requested.
    Computed PROMPT_LOGPROBS_CHUNK tokens at a time: the [T, V] float32 logits, log-softmax and top-k
    temporaries of a 2,048-token step were a 7 GB scratch buffer at a 151k vocabulary (an H100 ran out)."""
    T = hidden.shape[0]
    next_ids = jnp.maximum(inp.prompt_next_ids, 0)
    chunk = PROMPT_LOGPROBS_CHUNK if T % PROMPT_LOGPROBS_CHUNK == 0 else T

    def compute_chunk(args):
        h, ids = args
        return gather_logprobs(jax.nn.log_softmax(model.logits(h), axis=-1), ids, num_logprobs)

    def compute(h):
        out = jax.lax.map(compute_chunk, (h.reshape(T // chunk, chunk, -1), next_ids.reshape(T // chunk, chunk)))
        return jax.tree.map(lambda x: x.reshape(T, *x.shape[2:]), out)

    def skip(h):
        return (jnp.zeros((T,), jnp.float32), jnp.zeros((T,), jnp.int32),
                jnp.zeros((T, num_logprobs), jnp.float32), jnp.zeros((T, num_logprobs), jnp.int32))

    return jax.lax.cond(inp.want_prompt_logprobs, compute, skip, hidden)


def decode_loop(graphdef, params, state: DeviceState, inp: DecodeInput, *, max_steps: int, num_logprobs: int):
    """Up to ``max_steps`` decode steps in one ``lax.while_loop``; stops early when every row is done
    (max_new reached or a stop id sampled). Returns (new state, DecodeOutput)."""
    model = nnx.merge(graphdef, params)
    B = inp.token_ids.shape[0]
    page_size = state.kv.page_size
    rows = jnp.arange(B, dtype=jnp.int32)
    empty = DecodeOutput(
        token_ids=jnp.zeros((max_steps, B), jnp.int32), logprob=jnp.zeros((max_steps, B), jnp.float32),
        rank=jnp.zeros((max_steps, B), jnp.int32),
        top_logprobs=jnp.zeros((max_steps, B, num_logprobs), jnp.float32),
        top_token_ids=jnp.zeros((max_steps, B, num_logprobs), jnp.int32),
        num_generated=jnp.zeros((B,), jnp.int32), slot_tokens=inp.slot_tokens)

    def active_rows(carry):
        _, _, generated, stopped, _, _ = carry
        return (generated < inp.max_new) & ~stopped

    def cond(carry):
        i = carry[0]
        return (i < inp.num_steps) & jnp.any(active_rows(carry))

    def body(carry):
        i, state, generated, stopped, tokens, out = carry
        active = active_rows(carry)
        positions = inp.positions + generated
        page = jnp.take_along_axis(inp.page_table, (positions // page_size)[:, None], axis=1, mode="clip")[:, 0]
        slots = jnp.where(active, page * page_size + positions % page_size, 0)
        md = AttentionMetadata(
            seq_ids=rows, positions=positions, slot_mapping=slots, page_table=inp.page_table,
            context_lens=jnp.where(active, positions + 1, 0), query_start_loc=jnp.arange(B + 1, dtype=jnp.int32),
            num_tokens=jnp.asarray(B, jnp.int32), decode_only=True)
        logits, kv = model(tokens, state.kv, md, rows)
        state = dataclasses.replace(state, kv=kv)
        counts, mask = slot_rows(state, inp.row_slots)
        sampling = dataclasses.replace(inp.sampling, step=inp.sampling.step + generated)
        sampled = sample(logits, sampling, counts, mask, num_logprobs)
        state = count_sampled(state, inp.row_slots, sampled.token_ids, active)
        out = DecodeOutput(
            token_ids=out.token_ids.at[i].set(sampled.token_ids), logprob=out.logprob.at[i].set(sampled.logprob),
            rank=out.rank.at[i].set(sampled.rank), top_logprobs=out.top_logprobs.at[i].set(sampled.top_logprobs),
            top_token_ids=out.top_token_ids.at[i].set(sampled.top_token_ids), num_generated=out.num_generated,
            slot_tokens=out.slot_tokens)
        hit_stop = jnp.any(sampled.token_ids[:, None] == inp.stop_ids, axis=1)
        stopped = stopped | (active & hit_stop)
        generated = generated + active.astype(jnp.int32)
        tokens = jnp.where(active, sampled.token_ids, tokens)
        return i + 1, state, generated, stopped, tokens, out

    first = feed_tokens(inp.token_ids, inp.slot_tokens, inp.row_slots)
    init = (jnp.asarray(0, jnp.int32), state, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool), first, empty)
    _, state, generated, _, tokens, out = jax.lax.while_loop(cond, body, init)
    slot_tokens = record_slot_tokens(inp.slot_tokens, inp.row_slots, tokens, generated > 0)
    return state, dataclasses.replace(out, num_generated=generated, slot_tokens=slot_tokens)
