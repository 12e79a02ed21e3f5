"""On-device sampling of the next token of every batch row, with vLLM (v1) semantics.

Owns: ``SamplingTensors`` (per-row sampling parameters as arrays), the penalty / min-tokens /
min-p / top-k / top-p transforms, ``sample`` and ``gather_logprobs``, and the helpers that keep the
per-slot penalty state (``output_counts``, ``prompt_mask``) current. It does not own choosing seeds
or slots (the engine), finishing requests (``autoglm_jax.stop_checker``) or the model.

Shapes: B = batch rows (a bucket), V = vocabulary, S = stop-token width (see ``from_params``),
N = number of top logprobs, R = rows updated, P = padded prompt length.

Everything per request is an array, never a static argument, so one compiled ``sample`` serves
every mix of parameters within a bucket; only ``num_logprobs`` (output shape) is static.

Order (vLLM's ``Sampler.forward``):
  1. raw logprobs = log_softmax(logits) (returned logprobs: vLLM's default ``raw_logprobs``).
  2. min_tokens: EOS and stop_token_ids get -inf while step < min_tokens.
  3. penalties: repetition (prompt + output tokens), frequency and presence (output tokens).
  4. greedy rows (temperature < 1e-5) take argmax of the penalized logits.
  5. other rows: / temperature -> min_p -> top_k -> top_p -> sample.
Randomness: row b draws from key fold_in(fold_in(key(0), seed[b]), step[b]), so a seeded request
gives the same tokens whatever else is in the batch and whichever row it occupies. Sampling uses
the Gumbel-max trick, the same distribution as vLLM's exponential race ``argmax(probs / q)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.sampling_params import SAMPLING_EPS, SamplingParams

STOP_IDS_MIN_WIDTH = 4  # default S: the smallest power of two >= this and >= the longest stop list


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array         # [B] f32; < 1e-5 = greedy
    top_k: jax.Array               # [B] int32; 0 = off
    top_p: jax.Array               # [B] f32; 1 = off
    min_p: jax.Array               # [B] f32; 0 = off
    presence_penalty: jax.Array    # [B] f32; 0 = off
    frequency_penalty: jax.Array   # [B] f32; 0 = off
    repetition_penalty: jax.Array  # [B] f32; 1 = off
    seed: jax.Array                # [B] uint32: low 32 bits of the request's seed
    step: jax.Array                # [B] int32: tokens the request has generated so far
    min_tokens: jax.Array          # [B] int32
    want_logprobs: jax.Array       # [B] bool: the row's request asks for logprobs (ranks / top-N computed only then)
    stop_token_ids: jax.Array      # [B, S] int32: EOS + stop_token_ids of rows with step < min_tokens; -1 pad

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams | None],
        seeds: Sequence[int],
        steps: Sequence[int],
        batch_bucket: int,
        eos_token_ids: Sequence[int] = (),
        stop_ids_width: int | None = None,
    ) -> "SamplingTensors":
        """Host-side construction (numpy in, device arrays out), padded to ``batch_bucket`` rows.

        params[b]: the request in row b, or None for an empty row; seeds[b]: the request's seed
        (``params.seed`` when set, else one the engine drew for it); steps[b]: tokens it has
        generated so far. Empty and padding rows are greedy with every filter off. eos_token_ids
        join each row's stop_token_ids for the min_tokens mask (as vLLM, even with ignore_eos).
        stop_ids_width: a fixed S (so the shape never changes between steps; a longer list raises
        ValueError); None sizes S by the rule of ``STOP_IDS_MIN_WIDTH``.
        """
        if not len(params) == len(seeds) == len(steps):
            raise ValueError(f"params ({len(params)}), seeds ({len(seeds)}) and steps ({len(steps)}) differ in length")
        if len(params) > batch_bucket:
            raise ValueError(f"{len(params)} rows do not fit batch_bucket={batch_bucket}")
        rows = HostRows(batch_bucket)
        for b, (p, seed, step) in enumerate(zip(params, seeds, steps)):
            if p is not None:
                rows.fill(b, p, seed, step, eos_token_ids)
        return rows.to_tensors(stop_ids_width)


class HostRows:
    """Numpy buffers behind ``SamplingTensors.from_params``; defaults are greedy, filters off."""

    def __init__(self, batch_bucket: int):
        self.fields = {
            "temperature": np.zeros(batch_bucket, np.float32),
            "top_k": np.zeros(batch_bucket, np.int32),
            "top_p": np.ones(batch_bucket, np.float32),
            "min_p": np.zeros(batch_bucket, np.float32),
            "presence_penalty": np.zeros(batch_bucket, np.float32),
            "frequency_penalty": np.zeros(batch_bucket, np.float32),
            "repetition_penalty": np.ones(batch_bucket, np.float32),
            "seed": np.zeros(batch_bucket, np.uint32),
            "step": np.zeros(batch_bucket, np.int32),
            "min_tokens": np.zeros(batch_bucket, np.int32),
            "want_logprobs": np.zeros(batch_bucket, bool),
        }
        self.stop_lists: list[list[int]] = [[] for _ in range(batch_bucket)]

    def fill(self, b: int, p: SamplingParams, seed: int, step: int, eos_token_ids: Sequence[int]) -> None:
        f = self.fields
        f["temperature"][b] = p.temperature
        f["top_k"][b] = min(max(p.top_k, 0), np.iinfo(np.int32).max)  # any k >= vocab means "off"
        f["top_p"][b] = p.top_p
        f["min_p"][b] = p.min_p
        f["presence_penalty"][b] = p.presence_penalty
        f["frequency_penalty"][b] = p.frequency_penalty
        f["repetition_penalty"][b] = p.repetition_penalty
        f["seed"][b] = int(seed) & 0xFFFFFFFF
        f["step"][b] = step
        f["min_tokens"][b] = p.min_tokens
        f["want_logprobs"][b] = p.logprobs is not None
        if step < p.min_tokens:
            self.stop_lists[b] = list(dict.fromkeys([*eos_token_ids, *p.stop_token_ids]))

    def to_tensors(self, stop_ids_width: int | None) -> SamplingTensors:
        longest = max(len(s) for s in self.stop_lists)
        if stop_ids_width is not None:
            if longest > stop_ids_width:
                raise ValueError(f"{longest} eos + stop token ids in one row exceed stop_ids_width={stop_ids_width}")
            width = stop_ids_width
        else:
            width = STOP_IDS_MIN_WIDTH
            while width < longest:
                width *= 2
        stop_ids = np.full((len(self.stop_lists), width), -1, np.int32)
        for b, ids in enumerate(self.stop_lists):
            stop_ids[b, : len(ids)] = ids
        host = SamplingTensors(**self.fields, stop_token_ids=stop_ids)
        return jax.device_put(host)  # one batched host -> device transfer of every field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array      # [B] int32: the sampled tokens
    logprob: jax.Array        # [B] f32: raw logprob of the sampled token
    # rank and top-N: 0 for every row unless some row of the batch asks for logprobs (want_logprobs)
    rank: jax.Array           # [B] int32: 1-based rank of the sampled token under the raw logprobs
    top_logprobs: jax.Array   # [B, N] f32: the N largest raw logprobs, descending
    top_token_ids: jax.Array  # [B, N] int32: their token ids


def apply_min_tokens(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """logits [B, V] f32 -> same, with each row's stop tokens at -inf while step < min_tokens."""
    num_rows, vocab = logits.shape
    ids = tensors.stop_token_ids
    active = (tensors.step < tensors.min_tokens)[:, None] & (ids >= 0) & (ids < vocab)
    ids = jnp.where(active, ids, vocab)  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], ids.shape)
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def apply_penalties(
    logits: jax.Array, output_counts: jax.Array, prompt_mask: jax.Array, tensors: SamplingTensors
) -> jax.Array:
    """vLLM's penalties. logits [B, V] f32; output_counts [B, V] int32; prompt_mask [B, V] bool.

    Tokens seen in the prompt or output: positive logits divided by repetition_penalty, others
    multiplied by it. Then logits -= frequency_penalty * count + presence_penalty * (count > 0).
    """
    output_mask = output_counts > 0
    seen = prompt_mask | output_mask
    repetition = tensors.repetition_penalty[:, None]
    scale = jnp.where(logits > 0, 1.0 / repetition, repetition)
    logits = jnp.where(seen, logits * scale, logits)
    logits = logits - tensors.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - tensors.presence_penalty[:, None] * output_mask.astype(jnp.float32)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """logits [B, V], min_p [B]: drop tokens with prob < min_p * max prob (done in logit space)."""
    threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V]; top_k [B] int32 (0 = off); top_p [B] f32 (1 = off). Masked tokens -> -inf.

    top_k keeps every token >= the k-th largest logit (ties kept, as vLLM). top_p then keeps the
    smallest prefix of the descending order whose probability (after top_k) reaches top_p: a
    token is kept when the mass strictly above it is < top_p, so the top token always stays.
    """
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    in_top_k = sorted_desc >= kth
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    # top_p >= 1 keeps everything exactly (f32 cumsum may reach 1 before the tail).
    in_top_p = (mass_above < top_p[:, None]) | (top_p >= 1.0)[:, None]
    num_kept = jnp.sum(in_top_k & in_top_p, axis=-1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _row_gumbel(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed), step)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def _sample_random_rows(logits: jax.Array, tensors: SamplingTensors, greedy: jax.Array) -> jax.Array:
    """logits [B, V] penalized -> [B] int32: argmax for greedy rows, a filtered sample for the rest."""
    vocab = logits.shape[-1]
    greedy_ids = jnp.argmax(logits, axis=-1)
    logits = logits / jnp.where(greedy, 1.0, tensors.temperature)[:, None]
    logits = apply_min_p(logits, tensors.min_p)
    needs_sort = jnp.any(~greedy & (((tensors.top_k > 0) & (tensors.top_k < vocab)) | (tensors.top_p < 1.0)))
    logits = jax.lax.cond(
        needs_sort, apply_top_k_top_p, lambda x, _k, _p: x, logits, tensors.top_k, tensors.top_p)
    gumbel = jax.vmap(_row_gumbel, in_axes=(0, 0, None))(tensors.seed, tensors.step, vocab)
    random_ids = jnp.argmax(logits + gumbel, axis=-1)
    return jnp.where(greedy, greedy_ids, random_ids).astype(jnp.int32)


def gather_logprobs(
    logprobs: jax.Array, token_ids: jax.Array, num_logprobs: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logprobs [T, V] f32, token_ids [T] int32 -> (logprob [T], rank [T] int32, top [T, N], top_ids [T, N]).

    rank = how many tokens have logprob >= the token's (1-based, as vLLM). Used for sampled tokens
    and, by the runner, for prompt tokens (prompt_logprobs).
    """
    vocab = logprobs.shape[-1]
    if not 0 <= num_logprobs <= vocab:
        raise ValueError(f"num_logprobs={num_logprobs} must be in [0, vocab_size={vocab}]")
    token_logprob = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)  # [T, 1]
    rank = jnp.sum(logprobs >= token_logprob, axis=-1, dtype=jnp.int32)
    if num_logprobs == 0:
        top, top_ids = logprobs[:, :0], jnp.zeros((logprobs.shape[0], 0), jnp.int32)
    else:
        top, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return token_logprob[:, 0], rank, top, top_ids.astype(jnp.int32)


def sample(
    logits: jax.Array,
    tensors: SamplingTensors,
    output_counts: jax.Array,
    prompt_mask: jax.Array,
    num_logprobs: int = 0,
) -> SamplerOutput:
    """Sample one token per row. logits [B, V] (any float dtype); output_counts [B, V] int32;
    prompt_mask [B, V] bool; num_logprobs: static N (0 = only the sampled token's logprob/rank).

    Jit with ``static_argnames="num_logprobs"``. When every row is greedy a ``lax.cond`` skips the
    temperature / filter / random path entirely; when no row wants logprobs another skips the ranks and
    the top-N (full-vocabulary passes per row).
    """
    logits = raw = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(raw, axis=-1)  # [B]: raw logprobs = raw - log_z, materialized only for ranks / top-N
    logits = apply_min_tokens(logits, tensors)
    logits = apply_penalties(logits, output_counts, prompt_mask, tensors)
    greedy = tensors.temperature < SAMPLING_EPS
    token_ids = jax.lax.cond(
        jnp.all(greedy),
        lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32),
        lambda x: _sample_random_rows(x, tensors, greedy),
        logits,
    )
    # The sampled token's logprob always (cumulative_logprob); its rank and the top-N only when some row
    # asks for logprobs: a full-vocabulary count and top-k per row per step otherwise wasted (as vLLM).
    logprob = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - log_z
    rows = logits.shape[0]
    rank, top, top_ids = jax.lax.cond(
        jnp.any(tensors.want_logprobs),
        lambda: gather_logprobs(raw - log_z[:, None], token_ids, num_logprobs)[1:],
        lambda: (jnp.zeros((rows,), jnp.int32), jnp.zeros((rows, num_logprobs), jnp.float32),
                 jnp.zeros((rows, num_logprobs), jnp.int32)))
    return SamplerOutput(token_ids=token_ids, logprob=logprob, rank=rank, top_logprobs=top, top_token_ids=top_ids)


def _valid_or_sentinel(index: jax.Array, size: int) -> jax.Array:
    """Indices outside [0, size) (e.g. -1 padding) -> size, which ``mode="drop"`` ignores."""
    return jnp.where((index >= 0) & (index < size), index, size)


def update_output_counts(output_counts: jax.Array, rows: jax.Array, token_ids: jax.Array) -> jax.Array:
    """output_counts [B, V] int32; rows [R], token_ids [R] int32 -> counts with +1 at each (row, token).

    Entries with a row or token outside range (use -1 for padding) are ignored. Rows may repeat
    (several tokens of one request in one step are all counted).
    """
    num_rows, vocab = output_counts.shape
    rows = _valid_or_sentinel(rows, num_rows)
    token_ids = _valid_or_sentinel(token_ids, vocab)
    return output_counts.at[rows, token_ids].add(1, mode="drop")


def reset_rows(
    output_counts: jax.Array, prompt_mask: jax.Array, rows: jax.Array, prompt_token_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Start fresh requests in slots ``rows``: counts zeroed, prompt_mask = the prompt's token set.

    output_counts [B, V] int32; prompt_mask [B, V] bool; rows [R] int32, distinct (-1 = unused
    entry); prompt_token_ids [R, P] int32 padded with -1.
    """
    num_rows, vocab = output_counts.shape
    rows = _valid_or_sentinel(rows, num_rows)
    ids = _valid_or_sentinel(prompt_token_ids, vocab)
    new_mask = jnp.zeros((rows.shape[0], vocab), bool)
    new_mask = new_mask.at[jnp.arange(rows.shape[0])[:, None], ids].set(True, mode="drop")
    output_counts = output_counts.at[rows].set(0, mode="drop")
    return output_counts, prompt_mask.at[rows].set(new_mask, mode="drop")
