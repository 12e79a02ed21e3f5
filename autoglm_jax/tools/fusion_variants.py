"""The decoder with each model-level fusion switchable, to show what the fusions remove.

Owns: a forward pass equal to ``model.decoder`` (same ``rms_norm``, ``linear``, rotary and attention
dispatch) whose weights are re-laid out from the production model's parameters per ``Fusions``:
  - fused_qkv:          one [H, QKV] projection        vs  q [H, Q], k [H, KV], v [H, KV];
  - fused_gate_up:      one [H, 2I] projection         vs  gate [H, I], up [H, I];
  - folded_norm_scales: input_norm / mlp_norm scales multiplied into the rows of the projection that
                        follows (the norm then only normalises) vs a separate scale multiply.
The production model is ``PRODUCTION`` (fused QKV and gate-up, norm scales not folded). The
final norm and the sandwich norms (GLM-4-0414) stay as they are: their outputs feed a residual add
or a tied embedding, so there is no projection to fold them into. The production model stays
untouched; this module is for analysis only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.attention import attention
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.model.layers import linear, rms_norm
from autoglm_jax.model.rope import apply_rotary


@dataclasses.dataclass(frozen=True)
class Fusions:
    fused_qkv: bool = True
    fused_gate_up: bool = True
    folded_norm_scales: bool = False

    @property
    def label(self) -> str:
        on = [name for name, value in dataclasses.asdict(self).items() if value]
        return "+".join(on) if on else "unfused"


PRODUCTION = Fusions()
UNFUSED = Fusions(fused_qkv=False, fused_gate_up=False, folded_norm_scales=False)
ALL_FUSIONS = Fusions(fused_qkv=True, fused_gate_up=True, folded_norm_scales=True)


def variant_weights(config: ModelConfig, layers: dict[str, jax.Array], fusions: Fusions) -> dict[str, jax.Array]:
    """Re-lays out the production stacked layer weights ([L, ...], see ``model.decoder``) for ``fusions``."""
    w = dict(layers)
    if fusions.folded_norm_scales:
        w["qkv"] = w["qkv"] * w.pop("input_norm")[:, :, None]
        w["gate_up"] = w["gate_up"] * w.pop("mlp_norm")[:, :, None]
    if not fusions.fused_qkv:
        splits = [config.q_size, config.q_size + config.kv_size]
        w["q"], w["k"], w["v"] = jnp.split(w.pop("qkv"), splits, axis=-1)
        if "qkv_bias" in w:
            w["q_bias"], w["k_bias"], w["v_bias"] = jnp.split(w.pop("qkv_bias"), splits, axis=-1)
    if not fusions.fused_gate_up:
        w["gate"], w["up"] = jnp.split(w.pop("gate_up"), 2, axis=-1)
        if "gate_up_bias" in w:
            w["gate_bias"], w["up_bias"] = jnp.split(w.pop("gate_up_bias"), 2, axis=-1)
    return w


def _normalize(x, w: dict, scale_name: str, eps: float):
    """RMS-normalise x [T, H]; scaled by w[scale_name] unless that scale was folded away."""
    if scale_name in w:
        return rms_norm(x, w[scale_name], eps)
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _qkv(config: ModelConfig, w: dict, h):
    if "qkv" in w:
        qkv = linear(w["qkv"], h, w.get("qkv_bias"))
        return jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    return tuple(linear(w[name], h, w.get(f"{name}_bias")) for name in ("q", "k", "v"))


def _gate_up(w: dict, h):
    if "gate_up" in w:
        return jnp.split(linear(w["gate_up"], h, w.get("gate_up_bias")), 2, axis=-1)
    return linear(w["gate"], h, w.get("gate_bias")), linear(w["up"], h, w.get("up_bias"))


def variant_layer(config: ModelConfig, w: dict, x, k_cache, v_cache, layer, md: AttentionMetadata, backend: str):
    """One decoder layer on x [T, H] with weights from ``variant_weights`` (one layer's slice)."""
    eps, D, T = config.rms_norm_eps, config.head_dim, x.shape[0]
    q, k, v = _qkv(config, w, _normalize(x, w, "input_norm", eps))
    q = apply_rotary(q.reshape(T, config.num_attention_heads, D), md.positions, config)
    k = apply_rotary(k.reshape(T, config.num_key_value_heads, D), md.positions, config)
    v = v.reshape(T, config.num_key_value_heads, D)
    attn, k_cache, v_cache = attention(backend, q, k, v, k_cache, v_cache, layer, md, D**-0.5)
    attn = linear(w["o"], attn.reshape(T, config.q_size), w.get("o_bias"))
    if config.sandwich_norms:
        attn = rms_norm(attn, w["post_attn_norm"], eps)
    x = x + attn
    gate, up = _gate_up(w, _normalize(x, w, "mlp_norm", eps))
    mlp = linear(w["down"], jax.nn.silu(gate) * up, w.get("down_bias"))
    if config.sandwich_norms:
        mlp = rms_norm(mlp, w["post_mlp_norm"], eps)
    return x + mlp, k_cache, v_cache


def variant_forward(config: ModelConfig, backend: str, params: dict, token_ids, kv: KVCache,
                    md: AttentionMetadata, logits_indices):
    """Logits [R, V] float32 at ``logits_indices`` [R] and the new cache, like ``CausalLM.__call__``.

    params: {"embed_tokens", "norm", "lm_head" (untied only), "layers": variant_weights(...)}.
    """
    x = jnp.take(params["embed_tokens"], token_ids, axis=0)

    def one_layer(carry, inputs):
        x, k_cache, v_cache = carry
        w, layer = inputs
        return variant_layer(config, w, x, k_cache, v_cache, layer, md, backend), None

    layers = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
    (x, k, v), _ = jax.lax.scan(one_layer, (x, kv.k, kv.v), (params["layers"], layers))
    x = rms_norm(x, params["norm"], config.rms_norm_eps)[logits_indices]
    head = params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]
    return linear(head, x, out_dtype=jnp.float32), KVCache(k=k, v=v)


def variant_params(config: ModelConfig, model_params: dict, fusions: Fusions) -> dict:
    """The production model's parameters (``nnx.split(model)[1]`` as a pure dict, arrays or
    ShapeDtypeStructs) re-laid out for ``variant_forward``."""
    def layout(layers):
        return variant_weights(config, layers, fusions)

    params = {"embed_tokens": model_params["embed_tokens"], "norm": model_params["norm"],
              "layers": jax.eval_shape(layout, model_params["layers"])
              if _is_abstract(model_params["layers"]) else layout(model_params["layers"])}
    if "lm_head" in model_params:
        params["lm_head"] = model_params["lm_head"]
    return params


def _is_abstract(tree) -> bool:
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(tree))
