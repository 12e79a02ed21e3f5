"""The TP weight layout: every shard's slice of the regrouped fused weights holds exactly the heads /
MLP columns that shard computes (replicated KV heads included), and bad TP sizes are refused."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from autoglm_jax.config import ModelConfig
from autoglm_jax.parallel.layout import param_spec, to_tp_layout
from autoglm_jax.parallel.shard_config import check_tensor_parallel, shard_model_config, tp_model_config

GLM = ModelConfig.from_preset("tiny-glm4").replace(num_attention_heads=8, num_key_value_heads=2, intermediate_size=96)


def _standard_params(config: ModelConfig, rng) -> dict:
    L, H, I = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    layers = {"qkv": rng.standard_normal((L, H, config.qkv_size)), "qkv_bias": rng.standard_normal((L, config.qkv_size)),
              "gate_up": rng.standard_normal((L, H, 2 * I)), "o": rng.standard_normal((L, config.q_size, H))}
    return {"embed_tokens": rng.standard_normal((config.vocab_size, H)), "layers": layers}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_each_shard_slice_holds_its_q_heads_their_kv_head_and_its_mlp_columns(tp):
    rng = np.random.default_rng(tp)
    params = _standard_params(GLM, rng)
    out = to_tp_layout(params, GLM, tp)["layers"]
    D, nq, nkv, inter = GLM.head_dim, GLM.num_attention_heads, GLM.num_key_value_heads, GLM.intermediate_size
    local = shard_model_config(tp_model_config(GLM, tp), tp)
    group = nq // nkv
    for name in ("qkv", "qkv_bias"):
        full, width = params["layers"][name], out[name].shape[-1] // tp
        assert out[name].shape[-1] == (nq + 2 * max(nkv, tp)) * D
        for s in range(tp):
            shard = out[name][..., s * width : (s + 1) * width]
            q, k, v = np.split(shard, [local.q_size, local.q_size + local.kv_size], axis=-1)
            heads = range(s * local.num_attention_heads, (s + 1) * local.num_attention_heads)
            np.testing.assert_array_equal(q, np.concatenate([full[..., h * D : (h + 1) * D] for h in heads], -1))
            kv_heads = sorted({h // group for h in heads})  # the KV heads this shard's q heads read
            assert len(kv_heads) == local.num_key_value_heads
            k_full = np.concatenate([full[..., (nq + j) * D : (nq + j + 1) * D] for j in kv_heads], -1)
            v_full = np.concatenate([full[..., (nq + nkv + j) * D : (nq + nkv + j + 1) * D] for j in kv_heads], -1)
            np.testing.assert_array_equal(k, k_full)
            np.testing.assert_array_equal(v, v_full)
    width = inter // tp
    for s in range(tp):
        gate, up = np.split(out["gate_up"][..., 2 * s * width : 2 * (s + 1) * width], 2, axis=-1)
        np.testing.assert_array_equal(gate, params["layers"]["gate_up"][..., s * width : (s + 1) * width])
        np.testing.assert_array_equal(up, params["layers"]["gate_up"][..., inter + s * width : inter + (s + 1) * width])
    assert out["o"] is params["layers"]["o"]  # row splits need no regrouping


def test_layout_works_on_device_arrays_like_numpy():
    import jax.numpy as jnp

    params = _standard_params(GLM, np.random.default_rng(0))
    host = to_tp_layout(params, GLM, 4)["layers"]
    device = to_tp_layout({**params, "layers": {k: jnp.asarray(v, jnp.float32) for k, v in params["layers"].items()}},
                          GLM, 4)["layers"]
    for name in host:
        np.testing.assert_allclose(np.asarray(device[name]), host[name].astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("changes, tp, message", [
    ({}, 3, "num_attention_heads=8"),
    ({"num_key_value_heads": 4}, 8, None),
    ({"num_attention_heads": 12, "num_key_value_heads": 3}, 4, "multiple of num_key_value_heads=3"),
    ({"intermediate_size": 100}, 8, "intermediate_size=100"),
    ({}, 0, "tensor_parallel_size=0"),
])
def test_tp_sizes_that_do_not_divide_the_model_are_refused_by_name(changes, tp, message):
    config = GLM.replace(**changes)
    if message is None:
        check_tensor_parallel(config, tp)
        return
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, tp)


def test_kv_heads_are_replicated_up_to_tp_and_shards_get_one_each():
    assert tp_model_config(GLM, 2).num_key_value_heads == 2
    assert tp_model_config(GLM, 8).num_key_value_heads == 8
    local = shard_model_config(tp_model_config(GLM, 4), 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (2, 1, 24)


def test_partition_specs_split_columns_rows_and_vocab():
    assert param_spec(("layers", "qkv"), GLM, 2) == P(None, None, "tp")
    assert param_spec(("layers", "o"), GLM, 2) == P(None, "tp", None)
    assert param_spec(("layers", "down"), GLM, 2) == P(None, "tp", None)
    assert param_spec(("layers", "o_bias"), GLM, 2) == P()
    assert param_spec(("layers", "input_norm"), GLM, 2) == P()
    assert param_spec(("embed_tokens",), GLM, 2) == P("tp", None)
    assert param_spec(("lm_head",), GLM, 2) == P(None, "tp")
    odd_vocab = GLM.replace(vocab_size=511)
    assert param_spec(("embed_tokens",), odd_vocab, 2) == P()  # replicated when tp does not divide V
    assert param_spec(("layers", "qkv"), GLM, 1) == P()
