"""The decoder-only causal LM as a Flax NNX module (GLM, GLM-4-0414, Llama, SmolLM2, Qwen2).

Owns: parameters and the forward pass embed -> L x [norm, attention, norm, MLP] -> norm -> lm_head.
Layer parameters are made, loaded, quantized and sharded stacked on a leading L axis, and the layers
run under ``lax.scan`` (compile time does not grow with depth). For serving on GPU the engine calls
``DecoderLayers.unstack()``: each stacked parameter becomes a tuple of L per-layer buffers and the
layers run unrolled — a scan slices each layer's weights out of the stack with a copy before its
GEMMs, which triples the HBM traffic of a weight-bound decode step (``benchmarks/layer_loop.py``).
The model never allocates pages, sees requests or samples tokens.
Under tensor parallelism (``tensor_parallel_axis`` set, run inside ``shard_map``) the same code runs
on one shard's weights; ``autoglm_jax.parallel.collectives`` supplies the all-reduces and gathers.

Parameters (H hidden, I intermediate, V vocab, L layers, QKV = (Nq + 2 Nkv) D, Q = Nq D):
    embed_tokens [V, H]; norm [H]; lm_head [H, V] (absent when tied)
    layers.input_norm [L, H]      layers.qkv [L, H, QKV]      layers.qkv_bias [L, QKV] (qkv_bias)
    layers.o [L, Q, H]            layers.o_bias [L, H] (o_bias)
    layers.post_attn_norm [L, H] (sandwich_norms)             layers.mlp_norm [L, H]
    layers.gate_up [L, H, 2I]  (gate first, then up)          layers.gate_up_bias [L, 2I] (mlp_bias)
    layers.down [L, I, H]         layers.down_bias [L, H] (mlp_bias)
    layers.post_mlp_norm [L, H] (sandwich_norms)
    (after ``unstack()``, each ``layers.*`` value is a tuple of L arrays without the L axis)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.attention import ATTENTION_BACKENDS, attention
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.model.layers import linear, rms_norm
from autoglm_jax.model.rope import apply_rotary
from autoglm_jax.parallel.collectives import all_reduce, gather_vocab, vocab_parallel_embed
from autoglm_jax.parallel.shard_config import shard_model_config


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer parameter shapes (without the leading L axis), only those the architecture has."""
    H, I = config.hidden_size, config.intermediate_size
    shapes = {"input_norm": (H,), "qkv": (H, config.qkv_size), "o": (config.q_size, H), "mlp_norm": (H,),
              "gate_up": (H, 2 * I), "down": (I, H)}
    if config.qkv_bias:
        shapes["qkv_bias"] = (config.qkv_size,)
    if config.o_bias:
        shapes["o_bias"] = (H,)
    if config.mlp_bias:
        shapes["gate_up_bias"] = (2 * I,)
        shapes["down_bias"] = (H,)
    if config.sandwich_norms:
        shapes["post_attn_norm"] = (H,)
        shapes["post_mlp_norm"] = (H,)
    return shapes


def _init(key, shape, dtype, name):
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
    """All L decoder layers, parameters stacked on axis 0."""

    def __init__(self, config: ModelConfig, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.names = tuple(sorted(layer_param_shapes(config)))
        L = config.num_hidden_layers
        for name, shape in layer_param_shapes(config).items():
            setattr(self, name, nnx.Param(_init(rngs.params(), (L, *shape), param_dtype, name)))
        self.scan = True  # static: False once unstack() has split the weights into per-layer buffers

    def unstack(self) -> None:
        """Splits every stacked parameter (an array or a pytree of arrays, e.g. a quantized weight, all
        leaves [L, ...]) into a tuple of L per-layer buffers, one parameter at a time (the stacked buffer
        is released once nothing else holds it), and makes the layers run unrolled. Sharded arrays keep
        their sharding minus the L axis. Idempotent."""
        if not self.scan:
            return
        L = self.config.num_hidden_layers
        for name in self.names:
            param = getattr(self, name)
            leaves, treedef = jax.tree.flatten(param.get_value())
            per_leaf = [_split_layers(leaf, L) for leaf in leaves]
            del leaves
            param.set_value(tuple(jax.tree.unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(L)))
        self.scan = False

    def __call__(self, x, kv_cache: KVCache, md: AttentionMetadata, attention_backend: str, tp_axis: str | None = None):
        weights = {name: getattr(self, name).get_value() for name in self.names}
        # Under tensor parallelism (inside shard_map over tp_axis) the weights are this shard's slice.
        config = self.config if tp_axis is None else shard_model_config(self.config, jax.lax.axis_size(tp_axis))
        if not self.scan:
            k, v = kv_cache.k, kv_cache.v
            for layer in range(config.num_hidden_layers):
                w = {name: weights[name][layer] for name in self.names}
                x, k, v = _unrolled_layer(config, w, x, k, v, jnp.int32(layer), md, attention_backend, tp_axis)
            return x, KVCache(k=k, v=v)

        def one_layer(carry, layer_inputs):
            x, k_cache, v_cache = carry
            w, layer = layer_inputs
            x, k_cache, v_cache = decoder_layer(config, w, x, k_cache, v_cache, layer, md, attention_backend, tp_axis)
            return (x, k_cache, v_cache), None

        layers = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
        (x, k, v), _ = jax.lax.scan(one_layer, (x, kv_cache.k, kv_cache.v), (weights, layers))
        return x, KVCache(k=k, v=v)


def _split_layers(stacked: jax.Array, num_layers: int) -> tuple[jax.Array, ...]:
    """[L, ...] -> L separate [...] buffers on the same devices (sharding kept, minus the L axis)."""
    if stacked.shape[:1] != (num_layers,):
        raise ValueError(f"expected a stacked layer parameter with leading axis {num_layers}, got {stacked.shape}")
    out_shardings = None
    sharding = getattr(stacked, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)[1:]
        out_shardings = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)),) * num_layers
    split = jax.jit(lambda a: tuple(a[i] for i in range(num_layers)), out_shardings=out_shardings)
    return split(stacked)


def decoder_layer(config: ModelConfig, w: dict, x, k_cache, v_cache, layer, md: AttentionMetadata, backend: str,
                  tp_axis: str | None = None):
    """One layer on x [T, H]; w holds this layer's weights (see module docstring), or under tensor
    parallelism this shard's slice (``parallel.layout``) with ``config`` the shard's sizes."""
    eps, D = config.rms_norm_eps, config.head_dim
    T = x.shape[0]
    h = rms_norm(x, w["input_norm"], eps)
    qkv = linear(w["qkv"], h, w.get("qkv_bias"))
    q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    q = apply_rotary(q.reshape(T, config.num_attention_heads, D), md.positions, config)
    k = apply_rotary(k.reshape(T, config.num_key_value_heads, D), md.positions, config)
    v = v.reshape(T, config.num_key_value_heads, D)
    attn, k_cache, v_cache = attention(backend, q, k, v, k_cache, v_cache, layer, md, D**-0.5)
    attn = _row_parallel(w["o"], attn.reshape(T, config.q_size), w.get("o_bias"), tp_axis)
    if config.sandwich_norms:
        attn = rms_norm(attn, w["post_attn_norm"], eps)
    x = x + attn
    h = rms_norm(x, w["mlp_norm"], eps)
    gate, up = jnp.split(linear(w["gate_up"], h, w.get("gate_up_bias")), 2, axis=-1)
    mlp = _row_parallel(w["down"], jax.nn.silu(gate) * up, w.get("down_bias"), tp_axis)
    if config.sandwich_norms:
        mlp = rms_norm(mlp, w["post_mlp_norm"], eps)
    return x + mlp, k_cache, v_cache




# The unrolled layers call this nested jit: the L calls share one trace and one lowered function (the
# layer index is a traced int32), so tracing and lowering a step program costs one layer, not L - on
# GLM-4-9B most of a cold start's serial warmup time. XLA inlines the calls before optimising, so the
# compiled program is the same as with the layers written out.
_unrolled_layer = jax.jit(decoder_layer, static_argnums=(0, 7, 8))

def _row_parallel(weight, x, bias, tp_axis: str | None):
    """x @ weight (+ bias). Under TP each shard holds rows of weight: the partial sums are all-reduced,
    then the (replicated) bias is added once."""
    if tp_axis is None:
        return linear(weight, x, bias)
    y = all_reduce(linear(weight, x), tp_axis)
    return y if bias is None else (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


class CausalLM(nnx.Module):
    """``logits, kv_cache = model(token_ids [T], kv_cache, metadata, logits_indices [S] | None)``.

    Positions come in ``metadata.positions``. Logits are float32, [S, V] for the selected flat token
    indices (the last token of each sequence when sampling) or [T, V] when ``logits_indices`` is None.
    """

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.bfloat16, attention_backend: str = "xla",
                 rngs: nnx.Rngs | None = None):
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.attention_backend = attention_backend
        # Mesh axis name when this graph runs as one shard inside shard_map (set by autoglm_jax.parallel).
        self.tensor_parallel_axis: str | None = None
        H, V = config.hidden_size, config.vocab_size
        self.embed_tokens = nnx.Param(_init(rngs.params(), (V, H), param_dtype, "embed_tokens"))
        self.layers = DecoderLayers(config, param_dtype, rngs)
        self.norm = nnx.Param(jnp.ones((H,), param_dtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(_init(rngs.params(), (H, V), param_dtype, "lm_head"))

    def __call__(self, token_ids, kv_cache: KVCache, md: AttentionMetadata, logits_indices=None):
        x, kv_cache = self.hidden_states(token_ids, kv_cache, md)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.logits(x), kv_cache

    def hidden_states(self, token_ids, kv_cache: KVCache, md: AttentionMetadata):
        """Final-normed hidden states [T, H] and the updated cache."""
        tp_axis = self.tensor_parallel_axis
        x = vocab_parallel_embed(self.embed_tokens[...], token_ids, self.config.vocab_size, tp_axis)
        x, kv_cache = self.layers(x, kv_cache, md, self.attention_backend, tp_axis)
        return rms_norm(x, self.norm[...], self.config.rms_norm_eps), kv_cache

    def logits(self, x):
        """x [S, H] -> float32 logits [S, V]."""
        head = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return gather_vocab(linear(head, x, out_dtype=jnp.float32), self.config.vocab_size, self.tensor_parallel_axis)
