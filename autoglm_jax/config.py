"""Model configuration: one frozen dataclass for every supported architecture.

Owns: the architecture facts the model needs (sizes, rotary layout, biases, norms), the named
presets, and the translation from a Hugging Face ``config.json``. It does not own engine settings
(see ``autoglm_jax.engine.config``) or weights.

Supported architectures (Hugging Face ``architectures[0]``):
  - ``GlmForCausalLM``   glm-4-9b-chat-hf: partial (0.5) interleaved rotary, qkv bias, fused gate_up.
  - ``Glm4ForCausalLM``  GLM-4-9B-0414 / GLM-4.1V text tower: as above plus sandwich norms.
  - ``LlamaForCausalLM`` Llama, SmolLM2: full half-split rotary, separate gate/up (fused at load).
  - ``Qwen2ForCausalLM`` Qwen2: Llama layout with qkv bias.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
)

# Rope scaling kinds we implement exactly as transformers does.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint/config describes a model this engine does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model.

    Shapes used across the package: H = hidden_size, I = intermediate_size, V = vocab_size,
    L = num_hidden_layers, Nq = num_attention_heads, Nkv = num_key_value_heads, D = head_dim.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    # True: rotate pairs (x[2i], x[2i+1]) as GLM does; False: halves (x[i], x[i + d/2]) as Llama.
    rope_interleaved: bool = False
    # ("default" | "linear" | "llama3", frozen tuple of (key, value) pairs of the HF rope_scaling).
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # GLM-4-0414: post_self_attn_layernorm and post_mlp_layernorm around the residual adds.
    sandwich_norms: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, {self.head_dim}]")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    def num_parameters(self) -> int:
        """Parameter count (embeddings and lm_head included)."""
        H, I, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        per_layer = H * self.qkv_size + self.q_size * H + 3 * H * I + 2 * H
        per_layer += self.qkv_size if self.qkv_bias else 0
        per_layer += H if self.o_bias else 0
        per_layer += (2 * I + H) if self.mlp_bias else 0
        per_layer += 2 * H if self.sandwich_norms else 0
        head = 0 if self.tie_word_embeddings else V * H
        return V * H + L * per_layer + H + head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict | str | os.PathLike) -> "ModelConfig":
        """Builds a config from a Hugging Face ``config.json`` (a dict, the file, or its directory)."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        archs = hf.get("architectures") or []
        if not archs:
            raise UnsupportedModelError(
                "config.json names no 'architectures'; supported: " + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (model_type={hf.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={hf['hidden_act']!r}: only 'silu' is implemented")
        if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=True is not implemented")
        is_glm = arch in ("GlmForCausalLM", "Glm4ForCausalLM")
        # transformers >= 5 nests rope settings in rope_parameters; older files use top-level keys.
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = dict(hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5 if is_glm else 1.0))
        scaling = {k: v for k, v in {**legacy_scaling, **rope}.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = {}
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        elif is_glm:
            qkv_bias, o_bias = bool(hf.get("attention_bias", True)), False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            rope_interleaved=is_glm,
            rope_scaling=tuple(sorted(scaling.items())),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sandwich_norms=arch == "Glm4ForCausalLM",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


_GLM_EOS = (151329, 151336, 151338)

PRESETS: dict[str, ModelConfig] = {
    "glm-4-9b-chat-hf": ModelConfig(
        architecture="GlmForCausalLM", vocab_size=151552, hidden_size=4096, intermediate_size=13696,
        num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        rms_norm_eps=1.5625e-07, rope_theta=10000.0, partial_rotary_factor=0.5, rope_interleaved=True,
        qkv_bias=True, max_position_embeddings=131072, eos_token_ids=_GLM_EOS, pad_token_id=151329,
    ),
    "glm-4-9b-0414": ModelConfig(
        architecture="Glm4ForCausalLM", vocab_size=151552, hidden_size=4096, intermediate_size=13696,
        num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5, rope_interleaved=True,
        qkv_bias=True, sandwich_norms=True, max_position_embeddings=32768, eos_token_ids=_GLM_EOS,
        pad_token_id=151329,
    ),
    # Text tower of GLM-4.1V-9B / AutoGLM-Phone-9B. Its M-RoPE reduces to this 1-D rotary for text
    # (temporal, height and width positions are equal for text tokens).
    "glm-4.1v-9b-text": ModelConfig(
        architecture="Glm4ForCausalLM", vocab_size=151552, hidden_size=4096, intermediate_size=13696,
        num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5, rope_interleaved=True,
        qkv_bias=True, sandwich_norms=True, max_position_embeddings=65536,
        eos_token_ids=_GLM_EOS + (151348,), pad_token_id=151329,
    ),
    "llama-3-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "qwen2-7b": ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, max_position_embeddings=32768,
        eos_token_ids=(151643, 151645),
    ),
    "smollm2-135m-instruct": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
    ),
    # Tiny random models for tests and CPU smoke runs (same code paths as the real ones).
    "tiny-glm4": ModelConfig(
        architecture="Glm4ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, partial_rotary_factor=0.5, rope_interleaved=True, qkv_bias=True,
        sandwich_norms=True, max_position_embeddings=1024, eos_token_ids=(1,),
    ),
    "tiny-llama": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_ids=(1,),
    ),
}
