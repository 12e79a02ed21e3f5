"""Tiny random-weight checkpoints of every supported architecture, written by transformers."""

from __future__ import annotations

import torch
import transformers

ARCHITECTURES = ("GlmForCausalLM", "Glm4ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0,
               eos_token_id=1, bos_token_id=2)


def tiny_hf_config(architecture: str, **overrides):
    kw = dict(_COMMON, **overrides)
    if architecture != "Qwen2ForCausalLM":
        kw.setdefault("head_dim", 16)
    if architecture == "GlmForCausalLM":
        return transformers.GlmConfig(attention_bias=True, **kw)
    if architecture == "Glm4ForCausalLM":
        return transformers.Glm4Config(attention_bias=True, **kw)
    if architecture == "LlamaForCausalLM":
        return transformers.LlamaConfig(rope_theta=10000.0, **kw)
    if architecture == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**kw)
    raise ValueError(architecture)


def tiny_hf_model(architecture: str, seed: int = 0, **overrides):
    """A float32 transformers model with non-trivial random weights (norms and biases too)."""
    torch.manual_seed(seed)
    config = tiny_hf_config(architecture, **overrides)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_tiny(architecture: str, directory, seed: int = 0, **overrides):
    model = tiny_hf_model(architecture, seed, **overrides)
    model.save_pretrained(directory, safe_serialization=True)
    return model
