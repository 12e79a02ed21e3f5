"""The tensor-parallel weight layout: fused columns regrouped per shard, and each weight's PartitionSpec.

Owns: the transform from the model's standard parameter tree (``model.decoder`` docstring) to the TP
layout, and the partition specs that split that layout over the "tp" mesh axis. A contiguous column
split of the standard fused weights would be WRONG — qkv columns are [q heads | k heads | v heads]
and gate_up columns are [gate | up] — so the transform reorders them into per-shard groups:

    qkv     [L, H, (Nq + 2 Nkv') D] -> [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...]   (shard s: q_s k_s v_s)
    gate_up [L, H, 2I]              -> [gate_0 | up_0 | gate_1 | up_1 | ...]
    (their biases the same way; Nkv' = max(Nkv, tp): KV heads replicated when Nkv < tp)

After it, "tp" splits qkv / gate_up columns, o / down rows, embed_tokens rows and lm_head columns
(vocab, when tp divides V); norms and the o / down biases are replicated. The transform works on
numpy (host) and jax (device, under jit) arrays alike. Quantized weight types are not handled here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from autoglm_jax.config import ModelConfig
from autoglm_jax.parallel.mesh import TP_AXIS
from autoglm_jax.parallel.shard_config import check_tensor_parallel, shards_vocab

KV_CACHE_SPEC = P(None, None, None, TP_AXIS, None)  # [L, P, page, Nkv', D]: KV heads over tp


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def _qkv_per_shard(w, config: ModelConfig, tp: int):
    """w [..., (Nq + 2 Nkv) D] -> [..., (Nq + 2 Nkv') D] in per-shard [q_s | k_s | v_s] groups."""
    xp, D = _xp(w), config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    q, k, v = w[..., : nq * D], w[..., nq * D : (nq + nkv) * D], w[..., (nq + nkv) * D :]
    if nkv < tp:  # shard s needs the KV head its query heads s * Nq/tp ... read
        heads = [(s * (nq // tp)) // (nq // nkv) for s in range(tp)]
        split = lambda a: [a[..., h * D : (h + 1) * D] for h in heads]  # noqa: E731
        k, v = xp.concatenate(split(k), axis=-1), xp.concatenate(split(v), axis=-1)
    qw, kw = q.shape[-1] // tp, k.shape[-1] // tp
    groups = []
    for s in range(tp):
        groups += [q[..., s * qw : (s + 1) * qw], k[..., s * kw : (s + 1) * kw], v[..., s * kw : (s + 1) * kw]]
    return xp.concatenate(groups, axis=-1)


def _gate_up_per_shard(w, tp: int):
    """w [..., 2I] = [gate | up] -> [gate_0 | up_0 | gate_1 | up_1 | ...]."""
    xp, inter = _xp(w), w.shape[-1] // 2
    gate, up, width = w[..., :inter], w[..., inter:], inter // tp
    return xp.concatenate([part for s in range(tp) for part in (gate[..., s * width : (s + 1) * width],
                                                                 up[..., s * width : (s + 1) * width])], axis=-1)


def to_tp_layout(params: dict, config: ModelConfig, tp: int) -> dict:
    """A new parameter tree (pure dict, standard layout in) in the TP layout for ``tp`` shards.

    ``config`` is the model's own config (not ``tp_model_config``). Leaves that need no regrouping are
    passed through unchanged (no copy).
    """
    check_tensor_parallel(config, tp)
    if tp == 1:
        return params
    layers = dict(params["layers"])
    for name in ("qkv", "qkv_bias"):
        if name in layers:
            layers[name] = _qkv_per_shard(layers[name], config, tp)
    for name in ("gate_up", "gate_up_bias"):
        if name in layers:
            layers[name] = _gate_up_per_shard(layers[name], tp)
    return {**params, "layers": layers}


_LAYER_SPECS = {  # leading axis L is never split
    "qkv": P(None, None, TP_AXIS), "qkv_bias": P(None, TP_AXIS),
    "o": P(None, TP_AXIS, None),
    "gate_up": P(None, None, TP_AXIS), "gate_up_bias": P(None, TP_AXIS),
    "down": P(None, TP_AXIS, None),
}


def param_spec(path: tuple[str, ...], config: ModelConfig, tp: int) -> P:
    """The PartitionSpec of the parameter at ``path`` (e.g. ("layers", "qkv")) in the TP layout."""
    name = path[-1]
    if tp == 1:
        return P()
    if path[0] == "layers":
        return _LAYER_SPECS.get(name, P())
    vocab = shards_vocab(config, tp)
    if name == "embed_tokens":
        return P(TP_AXIS, None) if vocab else P()
    if name == "lm_head":
        return P(None, TP_AXIS) if vocab else P()
    return P()


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_specs(tree, config: ModelConfig, tp: int):
    """The same tree (pure dict or nnx.State) with each array replaced by its PartitionSpec; layer weights
    may be stacked [L, ...] or unstacked (a tuple of L per-layer arrays, ``DecoderLayers.unstack``)."""
    def spec(path, _):
        names = tuple(n for n in map(_key_name, path) if n not in ("value", "raw_value"))
        if names[:1] == ("layers",) and names[-1].isdigit():  # one layer of DecoderLayers.unstack(): no L axis
            return P(*tuple(param_spec(names[:-1], config, tp))[1:])
        return param_spec(names, config, tp)

    return jax.tree_util.tree_map_with_path(spec, tree)
