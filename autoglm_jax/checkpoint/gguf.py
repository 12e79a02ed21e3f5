"""GGUF files (llama.cpp) -> ModelConfig and Hugging Face-named float32 tensors.

Owns: reading llama.cpp's metadata keys into a ``ModelConfig`` (``config_from_gguf``) and turning
each GGUF tensor back into the tensor ``transformers`` would hold (``iter_gguf_tensors``):
dequantized to float32, renamed (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``),
in torch layout ``[out_features, in_features]``, with llama.cpp's conversion-time rewrites undone:

  - ``llama``: ``convert_hf_to_gguf.py`` permutes the rows of Q and K for its rotary kernel; we
    apply the inverse, as ``transformers.modeling_gguf_pytorch_utils`` does.
  - ``chatglm`` (THUDM originals): a fused ``attn_qkv`` is split into q/k/v rows.
  - ``glm4`` / ``chatglm``: ``ffn_up`` holds HF's fused ``[gate; up]`` rows -> ``mlp.gate_up_proj``.

Does not own: opening the file (``checkpoint.gguf_file``), the HF-name -> parameter-tree mapping
and its shape checks (``checkpoint.params``), or the tokenizer.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np

from autoglm_jax.checkpoint.gguf_file import CheckpointError, gguf_metadata, open_gguf
from autoglm_jax.config import ModelConfig, UnsupportedModelError

# general.architecture -> Hugging Face architectures[0]
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "glm4": "Glm4ForCausalLM",     # GLM-4-0414 (sandwich norms)
    "chatglm": "GlmForCausalLM",   # glm-4-9b-chat (THUDM original or -hf)
}
_GLM_ARCHS = ("glm4", "chatglm")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Inside blk.N -> inside model.layers.N (gguf's TensorNameMap, read backwards).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_self_attn_layernorm",  # glm4 sandwich norms
    "post_ffw_norm": "post_mlp_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^([a-z_]+)\.(weight|bias)$")


# ---- config --------------------------------------------------------------------------------------


def config_from_gguf(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its ``{arch}.*`` and ``tokenizer.ggml.*`` metadata.

    Tied embeddings <=> no ``output.weight`` tensor. ``eos_token_ids`` holds llama.cpp's eos, then
    its end-of-turn (eot) and end-of-message (eom) tokens when present: all three end generation.
    """
    path = os.fspath(path)
    meta = gguf_metadata(path)
    tensors = {t.name: t for t in open_gguf(path).tensors}
    gguf_arch = meta.get("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF file {path} has general.architecture={gguf_arch!r}; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None, required: bool = False):
        value = meta.get(f"{gguf_arch}.{name}", default)
        if required and value is None:
            raise CheckpointError(f"GGUF file {path} lacks metadata key {gguf_arch}.{name}")
        if isinstance(value, list):
            raise UnsupportedModelError(f"GGUF file {path}: per-layer {gguf_arch}.{name}={value} is not supported")
        return value

    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads))
    hidden = int(key("embedding_length", required=True))
    head_dim = _head_dim(tensors, heads, kv_heads, key("attention.key_length"), path)
    rope_dim = int(key("rope.dimension_count", head_dim))
    if gguf_arch not in _GLM_ARCHS and rope_dim != head_dim:
        raise UnsupportedModelError(
            f"GGUF file {path}: {gguf_arch}.rope.dimension_count={rope_dim} != head_dim={head_dim} "
            f"(partial rotary is only implemented for GLM)"
        )
    embed = _tensor(tensors, "token_embd.weight", path)
    vocab = int(embed.shape[1])  # GGUF shapes are [in, out]: token_embd is [H, V]
    if key("vocab_size") not in (None, vocab):
        raise CheckpointError(
            f"GGUF file {path}: {gguf_arch}.vocab_size={key('vocab_size')} but token_embd has {vocab} rows")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[gguf_arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_hidden_layers=int(key("block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        partial_rotary_factor=rope_dim / head_dim,
        rope_interleaved=gguf_arch in _GLM_ARCHS,
        rope_scaling=_rope_scaling(key, tensors, path),
        qkv_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_down.bias" in tensors,
        sandwich_norms=gguf_arch == "glm4",
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(key("context_length", 4096)),
        **_special_tokens(meta),
    )


def _special_tokens(meta: dict) -> dict:
    """bos/pad ids and the tokens that end generation: eos, then eot and eom when present."""
    def token(kind: str):
        value = meta.get(f"tokenizer.ggml.{kind}_token_id")
        return None if value is None else int(value)

    eos = (token("eos"), token("eot"), token("eom"))
    return dict(bos_token_id=token("bos"), pad_token_id=token("padding"),
                eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)))


def _tensor(tensors: dict, name: str, path: str):
    if name not in tensors:
        raise CheckpointError(f"GGUF file {path} has no tensor {name!r}")
    return tensors[name]


def _head_dim(tensors: dict, heads: int, kv_heads: int, key_length, path: str) -> int:
    """D from the first layer's Q rows (or fused QKV rows); checked against attention.key_length."""
    if "blk.0.attn_q.weight" in tensors:
        rows, per_row = int(tensors["blk.0.attn_q.weight"].shape[1]), heads
    else:
        rows, per_row = int(_tensor(tensors, "blk.0.attn_qkv.weight", path).shape[1]), heads + 2 * kv_heads
    if rows % per_row:
        raise CheckpointError(f"GGUF file {path}: attention rows {rows} are not a multiple of {per_row} heads")
    head_dim = rows // per_row
    if key_length is not None and int(key_length) != head_dim:
        raise CheckpointError(
            f"GGUF file {path}: attention.key_length={key_length} but tensors give head_dim={head_dim}")
    return head_dim


def _rope_scaling(key, tensors: dict, path: str) -> tuple[tuple[str, Any], ...]:
    if "rope_freqs.weight" in tensors:
        raise UnsupportedModelError(
            f"GGUF file {path} stores per-frequency rope factors (rope_freqs.weight, Llama-3.1-style "
            f"'llama3' scaling); load the Hugging Face checkpoint of this model instead"
        )
    kind, factor = key("rope.scaling.type"), key("rope.scaling.factor")
    if kind is None and key("rope.scale_linear") is not None:  # files before rope.scaling.*
        kind, factor = "linear", key("rope.scale_linear")
    if kind in (None, "none"):
        return ()
    if kind != "linear":
        raise UnsupportedModelError(
            f"GGUF file {path}: rope.scaling.type={kind!r} is not implemented; supported: none, linear")
    if factor is None:
        raise CheckpointError(f"GGUF file {path}: rope.scaling.type='linear' without rope.scaling.factor")
    return () if float(factor) == 1.0 else (("factor", float(factor)), ("rope_type", "linear"))


# ---- tensors -------------------------------------------------------------------------------------


def iter_gguf_tensors(path: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array in torch layout) for every tensor, one at a time, file order.

    ``config`` (normally ``config_from_gguf(path)``) gives the head counts needed to split fused
    QKV rows and to undo the Llama rotary permutation. A tensor whose bytes do not fit its shape or
    the file, or whose name is unknown, raises CheckpointError naming the tensor and the file.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    gguf_arch = _gguf_architecture(config)
    _check_layout(reader.tensors, path)
    for tensor in reader.tensors:
        for hf_name, weights in _to_hf(tensor.name, _dequantize(tensor, path), gguf_arch, config, path):
            yield hf_name, weights


def _gguf_architecture(config: ModelConfig) -> str:
    for gguf_arch, hf_arch in GGUF_ARCHITECTURES.items():
        if hf_arch == config.architecture:
            return gguf_arch
    raise UnsupportedModelError(f"no GGUF architecture for {config.architecture!r}")


def _check_layout(tensors, path: str) -> None:
    """Every tensor's bytes match its shape and type, lie inside the file and overlap no other."""
    from gguf import GGML_QUANT_SIZES

    file_size = os.path.getsize(path)
    spans = []
    for t in tensors:
        block, type_bytes = GGML_QUANT_SIZES[t.tensor_type]
        dims = [int(d) for d in t.shape]
        if dims[0] % block:
            raise CheckpointError(
                f"tensor {t.name!r} in {path}: inner dimension {dims[0]} is not a multiple of the "
                f"{t.tensor_type.name} block size {block}"
            )
        expected = int(np.prod(dims)) // block * type_bytes
        if int(t.n_bytes) != expected or t.data.nbytes != expected:
            raise CheckpointError(
                f"tensor {t.name!r} in {path}: {t.data.nbytes} bytes of data for shape {dims[::-1]} "
                f"{t.tensor_type.name}, expected {expected} (corrupted or truncated file)"
            )
        if t.data_offset + expected > file_size:
            raise CheckpointError(f"tensor {t.name!r} in {path} ends past the end of the file (truncated file)")
        spans.append((int(t.data_offset), expected, t.name))
    spans.sort()
    for (start, size, name), (next_start, _, next_name) in zip(spans, spans[1:]):
        if start + size > next_start:
            raise CheckpointError(
                f"tensor {name!r} in {path} overlaps tensor {next_name!r}: its shape does not match "
                f"its data (corrupted file)"
            )


def _dequantize(tensor, path: str) -> np.ndarray:
    """float32 array of shape reversed(tensor.shape) (torch order)."""
    from gguf.quants import dequantize

    try:
        out = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"tensor {tensor.name!r} in {path}: cannot dequantize {tensor.tensor_type.name}: {e}") from e
    out = np.asarray(out, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
    if np.may_share_memory(out, tensor.data):  # F32 comes back as a view of the memory map
        out = out.copy()
    return out


def _to_hf(name: str, weights: np.ndarray, gguf_arch: str, config: ModelConfig, path: str):
    """The HF (name, array) pieces of one GGUF tensor: usually one, three for a fused QKV."""
    if match := _GLOBAL_TENSOR.match(name):
        base, kind = match.groups()
        if base in _GLOBAL_NAMES:
            return [(f"{_GLOBAL_NAMES[base]}.{kind}", weights)]
    elif match := _BLOCK_TENSOR.match(name):
        layer, base, kind = int(match.group(1)), match.group(2), match.group(3)
        if layer >= config.num_hidden_layers:
            raise CheckpointError(
                f"tensor {name!r} in {path}: layer {layer} >= num_hidden_layers={config.num_hidden_layers}")
        prefix = f"model.layers.{layer}"
        if base == "attn_qkv":
            pieces = _split_qkv(weights, config, name, path)
            return [(f"{prefix}.self_attn.{p}_proj.{kind}", _unpermute(w, p, gguf_arch, config, name, path))
                    for p, w in pieces]
        if base == "ffn_up" and gguf_arch in _GLM_ARCHS and weights.shape[0] == 2 * config.intermediate_size:
            return [(f"{prefix}.mlp.gate_up_proj.{kind}", weights)]
        if base in ("attn_q", "attn_k"):
            weights = _unpermute(weights, base[-1], gguf_arch, config, name, path)
        if base in _BLOCK_NAMES:
            return [(f"{prefix}.{_BLOCK_NAMES[base]}.{kind}", weights)]
    raise CheckpointError(f"unexpected tensor {name!r} in {path} for GGUF architecture {gguf_arch!r}")


def _split_qkv(weights: np.ndarray, config: ModelConfig, name: str, path: str) -> list[tuple[str, np.ndarray]]:
    """[Nq*D + 2*Nkv*D, ...] -> q [Nq*D, ...], k [Nkv*D, ...], v [Nkv*D, ...]."""
    if weights.shape[0] != config.qkv_size:
        raise CheckpointError(
            f"tensor {name!r} in {path} has {weights.shape[0]} rows, expected q+k+v={config.qkv_size}"
        )
    q, kv = config.q_size, config.kv_size
    return [("q", weights[:q]), ("k", weights[q : q + kv]), ("v", weights[q + kv :])]


def _unpermute(weights: np.ndarray, which: str, gguf_arch: str, config: ModelConfig, name: str,
               path: str) -> np.ndarray:
    """Inverse of llama.cpp's Llama Q/K row permutation (per head: halves -> interleaved pairs).

    llama.cpp moves HF row (h, i, j) of head h (half i in {0, 1}, j < D/2) to row (h, j, i); this
    reads the rows as [heads, D/2, 2] and swaps back to [heads, 2, D/2]. Only ``llama`` is permuted.
    """
    if gguf_arch != "llama" or which == "v":
        return weights
    heads = config.num_attention_heads if which == "q" else config.num_key_value_heads
    if weights.shape[0] != heads * config.head_dim:
        raise CheckpointError(
            f"tensor {name!r} in {path} has {weights.shape[0]} rows, expected {heads} heads x {config.head_dim}"
        )
    rest = weights.shape[1:]
    return np.ascontiguousarray(
        weights.reshape(heads, config.head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weights.shape)
    )
