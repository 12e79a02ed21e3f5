"""Model sizes under tensor parallelism: which TP sizes a model allows, and what one shard holds.

Owns: the arithmetic of the TP layout. With tp shards, each holds Nq/tp query heads, Nkv/tp KV heads
when Nkv >= tp, else ONE KV head (the KV heads are replicated so that every shard has the head its
query heads read: GLM-4's 2 KV heads at tp=4 become 4, each original head on two shards), I/tp MLP
columns, and V/tp vocabulary rows when tp divides V (replicated otherwise). Pure Python, no JAX.
"""

from __future__ import annotations

from autoglm_jax.config import ModelConfig


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raises ValueError naming the model size that ``tp`` does not divide."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel_size={tp!r} must be an int >= 1")
    nq, nkv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if nq % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide num_attention_heads={nq}")
    if nkv >= tp and nkv % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide num_key_value_heads={nkv}")
    if nkv < tp and tp % nkv:
        raise ValueError(f"tensor_parallel_size={tp} is not a multiple of num_key_value_heads={nkv} "
                         f"(needed to replicate KV heads across shards)")
    if inter % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide intermediate_size={inter}")


def tp_model_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The whole model as the TP layout stores it: KV heads replicated up to tp when Nkv < tp.

    Its KV cache is [L, P, page, max(Nkv, tp), D]; its weights are in ``layout.to_tp_layout`` order.
    """
    check_tensor_parallel(config, tp)
    if config.num_key_value_heads >= tp:
        return config
    return config.replace(num_key_value_heads=tp)


def shard_model_config(config: ModelConfig, tp: int) -> ModelConfig:
    """What ONE of tp shards computes, for a config already in TP layout (``tp_model_config``)."""
    if tp == 1:
        return config
    check_tensor_parallel(config, tp)
    if config.num_key_value_heads < tp:
        raise ValueError(f"num_key_value_heads={config.num_key_value_heads} < tp={tp}: pass tp_model_config(config, tp)")
    return config.replace(num_attention_heads=config.num_attention_heads // tp,
                          num_key_value_heads=config.num_key_value_heads // tp,
                          intermediate_size=config.intermediate_size // tp)


def shards_vocab(config: ModelConfig, tp: int) -> bool:
    """Whether embeddings / lm_head are split over the vocabulary (tp divides V) or replicated."""
    return tp > 1 and config.vocab_size % tp == 0
