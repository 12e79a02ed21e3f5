"""Hand counts of one serving step's FLOPs and minimum memory traffic, from the model's shapes alone.

Owns: the analytic model the compiled programs are checked against and the roofline's byte count.
FLOPs (multiply-add = 2):
  linear     2 * T * L * (H*QKV + Q*H + 3*H*I)       QKV/O projections, gate/up/down
  attention  4 * T * L * Nq * D * S                  Q K^T and P V over S context positions
  logits     2 * R * H * V                           R rows through the LM head
Minimum bytes: every parameter read once + the K/V of R rows over S positions read + T tokens' K/V
written. S is the context the program attends over (the XLA path attends over the whole padded
page table: MP * page_size); R is the rows that reach the LM head.
"""

from __future__ import annotations

import jax.numpy as jnp

from autoglm_jax.config import ModelConfig


def linear_flops(config: ModelConfig, num_tokens: int) -> int:
    H, I = config.hidden_size, config.intermediate_size
    per_layer = H * config.qkv_size + config.q_size * H + 3 * H * I
    return 2 * num_tokens * config.num_hidden_layers * per_layer


def attention_flops(config: ModelConfig, num_tokens: int, context: int) -> int:
    return 4 * num_tokens * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context


def logits_flops(config: ModelConfig, num_rows: int) -> int:
    return 2 * num_rows * config.hidden_size * config.vocab_size


def step_flops(config: ModelConfig, num_tokens: int, num_logit_rows: int, context: int) -> int:
    """Total matmul FLOPs of one forward over ``num_tokens`` tokens (see the module docstring)."""
    return (linear_flops(config, num_tokens) + attention_flops(config, num_tokens, context)
            + logits_flops(config, num_logit_rows))


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    return 2 * config.num_hidden_layers * config.kv_size * jnp.dtype(dtype).itemsize


def step_min_bytes(config: ModelConfig, dtype, num_tokens: int, num_rows: int, context: int,
                   cache_dtype=None) -> int:
    """Parameters read once + K/V of ``num_rows`` rows over ``context`` positions + new K/V written, the K/V in
    ``cache_dtype`` (None = ``dtype``: an fp8 cache moves half a bf16 one's bytes)."""
    params = config.num_parameters() * jnp.dtype(dtype).itemsize
    per_token = kv_bytes_per_token(config, dtype if cache_dtype is None else cache_dtype)
    return params + num_rows * context * per_token + num_tokens * per_token
