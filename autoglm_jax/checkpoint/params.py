"""Hugging Face tensor names -> our parameter tree, filled tensor by tensor into one host copy.

Owns: the one mapping from transformers' names/layouts (q/k/v, gate/up, [out, in] weights) to the
model's fused, [in, out] parameters (see ``model.decoder``), for every loader: safetensors directories
and GGUF files (whose loader renames to HF names first). A missing tensor, a shape mismatch or an
unexpected tensor is a CheckpointError naming it.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.config import ModelConfig
from autoglm_jax.model.decoder import layer_param_shapes

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors that carry nothing we need (recomputed rotary tables).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|^model\.rotary_emb)")


def _layer_targets(config: ModelConfig) -> dict[str, tuple[str, int, int, bool]]:
    """HF per-layer suffix -> (our param, column offset, column width, transpose)."""
    H, I, Q, KV = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    t = {
        "input_layernorm.weight": ("input_norm", 0, H, False),
        "post_attention_layernorm.weight": ("mlp_norm", 0, H, False),
        "self_attn.q_proj.weight": ("qkv", 0, Q, True),
        "self_attn.k_proj.weight": ("qkv", Q, KV, True),
        "self_attn.v_proj.weight": ("qkv", Q + KV, KV, True),
        "self_attn.o_proj.weight": ("o", 0, H, True),
        "mlp.down_proj.weight": ("down", 0, H, True),
        "mlp.gate_up_proj.weight": ("gate_up", 0, 2 * I, True),
        "mlp.gate_proj.weight": ("gate_up", 0, I, True),
        "mlp.up_proj.weight": ("gate_up", I, I, True),
    }
    if config.qkv_bias:
        t["self_attn.q_proj.bias"] = ("qkv_bias", 0, Q, False)
        t["self_attn.k_proj.bias"] = ("qkv_bias", Q, KV, False)
        t["self_attn.v_proj.bias"] = ("qkv_bias", Q + KV, KV, False)
    if config.o_bias:
        t["self_attn.o_proj.bias"] = ("o_bias", 0, H, False)
    if config.mlp_bias:
        t["mlp.gate_proj.bias"] = ("gate_up_bias", 0, I, False)
        t["mlp.up_proj.bias"] = ("gate_up_bias", I, I, False)
        t["mlp.gate_up_proj.bias"] = ("gate_up_bias", 0, 2 * I, False)
        t["mlp.down_proj.bias"] = ("down_bias", 0, H, False)
    if config.sandwich_norms:
        t["post_self_attn_layernorm.weight"] = ("post_attn_norm", 0, H, False)
        t["post_mlp_layernorm.weight"] = ("post_mlp_norm", 0, H, False)
    return t


class ParamAssembler:
    """Collects HF-named tensors into host buffers of the target dtype, one copy of the model."""

    def __init__(self, config: ModelConfig, dtype):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.layer_shapes = layer_param_shapes(config)
        self.targets = _layer_targets(config)
        self.buffers: dict[str, np.ndarray] = {}
        self.filled: dict[str, np.ndarray] = {}  # param -> bool [L, columns] coverage

    def _buffer(self, name: str) -> np.ndarray:
        if name not in self.buffers:
            shape = (self.config.num_hidden_layers, *self.layer_shapes[name])
            self.buffers[name] = np.empty(shape, self.dtype)
            self.filled[name] = np.zeros((shape[0], shape[-1]), bool)
        return self.buffers[name]

    def add(self, hf_name: str, tensor: np.ndarray, source: str = "") -> None:
        where = f" (in {source})" if source else ""
        if _IGNORED.search(hf_name):
            return
        match = _LAYER.match(hf_name)
        if match is None:
            self._add_global(hf_name, tensor, where)
            return
        layer, suffix = int(match.group(1)), match.group(2)
        if suffix not in self.targets or layer >= self.config.num_hidden_layers:
            raise CheckpointError(f"unexpected tensor {hf_name!r}{where} for {self.config.architecture}")
        name, offset, width, transpose = self.targets[suffix]
        value = np.asarray(tensor).T if transpose else np.asarray(tensor)
        buffer = self._buffer(name)
        expected = (*buffer.shape[1:-1], width)
        if value.shape != expected:
            raise CheckpointError(
                f"tensor {hf_name!r}{where} has shape {tuple(tensor.shape)}, expected "
                f"{expected[::-1] if transpose else expected}"
            )
        buffer[layer, ..., offset : offset + width] = value.astype(self.dtype)
        self.filled[name][layer, offset : offset + width] = True

    def _add_global(self, hf_name: str, tensor: np.ndarray, where: str) -> None:
        H, V = self.config.hidden_size, self.config.vocab_size
        if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
            return  # some tied checkpoints store a copy; the embedding is authoritative
        spec = {"model.embed_tokens.weight": ("embed_tokens", (V, H), False),
                "model.norm.weight": ("norm", (H,), False),
                "lm_head.weight": ("lm_head", (H, V), True)}.get(hf_name)
        if spec is None:
            raise CheckpointError(f"unexpected tensor {hf_name!r}{where} for {self.config.architecture}")
        name, shape, transpose = spec
        value = np.asarray(tensor).T if transpose else np.asarray(tensor)
        if value.shape != shape:
            raise CheckpointError(f"tensor {hf_name!r}{where} has shape {tuple(tensor.shape)}, expected "
                                  f"{shape[::-1] if transpose else shape}")
        self.buffers[name] = value.astype(self.dtype)

    def finish(self) -> dict:
        """The pure-dict parameter tree; raises CheckpointError listing what is missing."""
        missing = []
        for name in ["embed_tokens", "norm"] + ([] if self.config.tie_word_embeddings else ["lm_head"]):
            if name not in self.buffers:
                missing.append({"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                                "lm_head": "lm_head.weight"}[name])
        for name in self.layer_shapes:
            covered = self.filled.get(name)
            layers = range(self.config.num_hidden_layers) if covered is None else [
                i for i in range(covered.shape[0]) if not covered[i].all()]
            for layer in layers:
                sources = sorted({s for s, t in self.targets.items() if t[0] == name})
                missing.append(f"model.layers.{layer}.{' / '.join(sources)}")
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise CheckpointError(f"checkpoint is missing tensors: {shown}")
        params = {k: v for k, v in self.buffers.items() if k not in self.layer_shapes}
        params["layers"] = {k: self.buffers[k] for k in self.layer_shapes}
        return params


def assemble_params(config: ModelConfig, named_tensors: Iterable[tuple[str, np.ndarray, str]], dtype) -> dict:
    """Fills the parameter tree from (hf_name, tensor, source_file) triples."""
    assembler = ParamAssembler(config, dtype)
    for name, tensor, source in named_tensors:
        assembler.add(name, tensor, source)
    return assembler.finish()
