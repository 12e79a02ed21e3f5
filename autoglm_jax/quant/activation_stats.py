"""Input statistics of the quantized linears: the Gram matrix X^T X of each layer's inputs on the model's
own activations, which calibration (``quant.calibration``) and GPTQ (``quant.gptq``) minimise against.

Owns: running calibration token sequences through the float model (several packed into one prefill)
and accumulating, per ruled [L, K, N] weight, G = sum_t w_t x_t x_t^T [L, K, K] (float64) with the
token weights w_t below. Does not own what is done with G.

Token weights:
  * a prefix every sequence shares (a chat template's system prompt) counts once, not once per
    sequence, so the statistics are not dominated by the same positions repeated;
  * the first position of each sequence is the attention sink: every later position of the sequence
    reads its key and value (most heads put much of their attention there). For the weights that make
    keys and values (``SINK_PATHS``: ``layers/qkv``), its row counts once per position that attends to
    it, i.e. w_0 = the number of counted positions of the sequence (of all sequences, for a shared
    first token). Without it GPTQ pushes its rounding error into the sink's rarely-seen direction:
    on SmolLM2, int4-g64 GPTQ of qkv alone gave KL 0.22 (worse than round-to-nearest's 0.12); with it
    0.024 (benchmarks/RESULTS.md). Other weights are not sink-weighted: the sink's residual stream
    carries SmolLM2's massive activations, which the following norms divide away, and weighting it in
    ``layers/down`` made GPTQ there worse (KL 0.044 -> 0.086).

Activations are captured without touching the layers: the target weights are wrapped in ``_Tap``
pytrees whose ``linear`` rule sends x to the host (``jax.debug.callback``) and then runs the real rule.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.model.layers import linear
from autoglm_jax.quant.transform import QuantRules, as_rules, is_quantized
from autoglm_jax.tree_paths import flatten

PAGE_SIZE = 16
PACK_TOKENS = 512  # tokens per prefill: sequences are packed up to this (one compiled shape)
SINK_PATHS = r"layers/qkv"


class _GramSink:
    """Host accumulator: path -> float64 [L, K, K] sum of w_t x_t x_t^T, for the rows of the current
    packed prefill that count (``rows``) and its sink rows with their extra weights (``sinks``)."""

    def __init__(self, sink_paths: str):
        self.grams: dict[str, np.ndarray] = {}
        self.sink_paths = sink_paths
        self.rows = np.zeros(0, np.int64)
        self.sinks = (np.zeros(0, np.int64), np.zeros(0))

    def add(self, path: str, layer, x) -> None:
        x = np.asarray(x, np.float32)
        counted = x[self.rows]
        update = (counted.T @ counted).astype(np.float64)
        sink_rows, sink_weights = self.sinks
        if len(sink_rows) and re.fullmatch(self.sink_paths, path):
            xs = x[sink_rows].astype(np.float64)
            update += (xs * sink_weights[:, None]).T @ xs
        self.grams[path][int(layer)] += update


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "layer"], meta_fields=["path", "sink"])
@dataclasses.dataclass(frozen=True)
class _Tap:
    """A float weight [.., K, N] plus its layer index [..], reporting its input to ``sink``."""

    weight: jax.Array
    layer: jax.Array
    path: str
    sink: _GramSink

    def __getitem__(self, index):
        return self


@linear.register
def _linear_tap(weight: _Tap, x, bias=None, out_dtype=None):
    jax.debug.callback(functools.partial(weight.sink.add, weight.path), weight.layer, x)
    return linear(weight.weight, x, bias, out_dtype)


def shared_prefix_length(token_seqs) -> int:
    """Length of the prefix all sequences share (e.g. a chat template's system prompt)."""
    first = token_seqs[0] if token_seqs else []
    n = 0
    while n < len(first) and all(len(s) > n and s[n] == first[n] for s in token_seqs):
        n += 1
    return n


def _packs(lengths: list[int], limit: int) -> list[list[int]]:
    """Sequence indices grouped in order so that each group's lengths sum to at most ``limit``."""
    packs, total = [[]], 0
    for index, n in enumerate(lengths):
        if packs[-1] and total + n > limit:
            packs.append([])
            total = 0
        packs[-1].append(index)
        total += n
    return packs


def _counted_rows(lengths: list[int], first: list[bool], shared: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one pack of sequences laid out back to back: (flat rows that count, sink rows, their extra
    weights). The first sequence overall counts whole; the others without the shared prefix. A sink
    row counts once per counted position of its sequence (once already if it is itself counted)."""
    rows, sink_rows, sink_weights, offset = [], [], [], 0
    for n, is_first in zip(lengths, first):
        start = 0 if is_first else min(shared, n)
        rows.append(np.arange(offset + start, offset + n))
        if n:
            sink_rows.append(offset)
            sink_weights.append((n - start) - (1 if start == 0 else 0))
        offset += n
    return np.concatenate(rows), np.asarray(sink_rows, np.int64), np.asarray(sink_weights, np.float64)


def _tap_model(model: nnx.Module, rules: QuantRules, sink: _GramSink) -> nnx.Module:
    """A copy of ``model`` whose ruled stacked weights report their inputs to ``sink``."""
    graphdef, state = nnx.split(model)
    tapped = nnx.merge(graphdef, state)
    for path, value in flatten(nnx.to_pure_dict(nnx.state(tapped, nnx.Param))).items():
        if rules.scheme_for(path) is None:
            continue
        if is_quantized(value) or value.ndim != 3:
            raise ValueError(f"calibration needs a float stacked [L, K, N] weight at {path!r}")
        *parents, name = path.split("/")
        owner = functools.reduce(getattr, parents, tapped)
        L, K, _ = value.shape
        setattr(owner, name, nnx.Param(_Tap(value, jnp.arange(L, dtype=jnp.int32), path, sink)))
        sink.grams[path] = np.zeros((L, K, K), np.float64)
    if not sink.grams:
        raise ValueError(f"quantization rules {rules.rules} match no stacked weight of the model")
    return tapped


def collect_input_stats(model: nnx.Module, token_seqs, rules: QuantRules | str,
                        sink_paths: str = SINK_PATHS) -> tuple[dict[str, np.ndarray], int]:
    """({path: Gram float64 [L, K, K]} of the inputs of every ruled [L, K, N] weight, positions counted).

    ``token_seqs``: token-id lists, each run from position 0 (several packed into one prefill of
    ``PACK_TOKENS``; a longer one alone). Token weights: see the module docstring (``sink_paths``: regex
    of the paths whose attention-sink rows are weighted; "" for none).
    """
    token_seqs = [list(s) for s in token_seqs if len(s)]
    if not token_seqs:
        raise ValueError("calibration needs at least one non-empty token sequence")
    shared = shared_prefix_length(token_seqs) if len(token_seqs) > 1 else 0
    sink = _GramSink(sink_paths)
    tapped = _tap_model(model, as_rules(rules), sink)
    config, dtype = model.config, model.embed_tokens[...].dtype
    graphdef, state = nnx.split(tapped)

    @jax.jit
    def run(state, tokens, cache, md):
        return nnx.merge(graphdef, state).hidden_states(tokens, cache, md)[0]

    lengths = [len(s) for s in token_seqs]
    packs = _packs(lengths, PACK_TOKENS)
    # One shape for every pack (one compile): the token bucket, the widest page table, the most rows.
    bucket = -(-max(PACK_TOKENS, *lengths) // PAGE_SIZE) * PAGE_SIZE
    width = -(-max(lengths) // PAGE_SIZE)
    rows = max(len(pack) for pack in packs)
    counted = 0
    for pack in packs:
        pack_lengths = [lengths[i] for i in pack]
        table = np.zeros((rows, width), np.int32)
        next_page = 1  # page 0 is the scratch page padding writes to
        for row, n in enumerate(pack_lengths):
            table[row, :-(-n // PAGE_SIZE)] = np.arange(next_page, next_page + -(-n // PAGE_SIZE))
            next_page += -(-n // PAGE_SIZE)
        cache = KVCache.create(config, bucket // PAGE_SIZE + rows + 1, PAGE_SIZE, dtype)
        query_lens = np.zeros(rows, np.int32)
        query_lens[:len(pack)] = pack_lengths
        md = AttentionMetadata.build(np.zeros(rows, np.int32), query_lens, table, PAGE_SIZE, bucket)
        tokens = np.zeros(bucket, np.int32)
        tokens[:sum(pack_lengths)] = np.concatenate([token_seqs[i] for i in pack])
        sink.rows, *sinks = _counted_rows(pack_lengths, [i == 0 for i in pack], shared)
        sink.sinks = tuple(sinks)
        run(state, jnp.asarray(tokens), cache, md).block_until_ready()
        jax.effects_barrier()
        counted += len(sink.rows)
    return sink.grams, counted
