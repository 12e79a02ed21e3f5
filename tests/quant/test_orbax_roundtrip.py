"""``convert --quantization`` writes a quantized Orbax checkpoint that loads without recomputing scales."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.checkpoint.convert import convert_checkpoint
from autoglm_jax.checkpoint.loader import load_model, load_params, resolve_model_source
from autoglm_jax.quant import model_manifest, quantize_params
from autoglm_jax.tree_paths import flatten
from tests.model_runner import forward, new_cache


@pytest.mark.parametrize("scheme", ["fp8", "int4-g64", "q4_1"])
def test_quantized_checkpoint_round_trips(tmp_path, scheme):
    from tests.hf_tiny import save_tiny

    src = tmp_path / "hf"
    save_tiny("Glm4ForCausalLM", src, seed=11)
    out = convert_checkpoint(str(src), str(tmp_path / "orbax"), "float32", quantization=scheme)
    with open(os.path.join(out, "autoglm_metadata.json")) as f:
        meta = json.load(f)
    assert meta["quantization"]["scheme"] == scheme
    assert set(meta["quantization"]["weights"]) == {"layers/qkv", "layers/o", "layers/gate_up", "layers/down"}

    config, restored, _ = load_model(out, jnp.float32)
    assert set(model_manifest(restored).values()) == {scheme}
    _, expected = load_params(resolve_model_source(str(src)), jnp.float32)
    expected, _ = quantize_params(expected, scheme)
    from flax import nnx

    got = flatten(nnx.to_pure_dict(nnx.state(restored, nnx.Param)))
    for path, weight in flatten(expected).items():
        for a, b in zip(jax.tree.leaves(weight), jax.tree.leaves(got[path])):
            assert a.dtype == b.dtype, path  # fp8 / uint8 / float16 arrays keep their dtypes
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    _, live, _ = load_model(str(src), jnp.float32, quantization=scheme)
    tokens = np.random.default_rng().integers(3, config.vocab_size, 20)
    cache, table = new_cache(config, 20)
    a = forward(restored, tokens, 0, cache, table)[0]
    cache, table = new_cache(config, 20)
    np.testing.assert_allclose(a, forward(live, tokens, 0, cache, table)[0], rtol=1e-5, atol=1e-5)

    _, again, _ = load_model(out, jnp.float32, quantization=scheme)  # same scheme: accepted
    with pytest.raises(ValueError, match="quantized already"):
        load_model(out, jnp.float32, quantization="int8")


def test_int4_input_scales_round_trip(tmp_path):
    """A model whose int4 weights carry activation-aware ``in_scales`` (as calibration makes them; here
    on two projections, the others plain round-to-nearest) saves and restores them exactly, and the
    restored model computes the same logits."""
    from flax import nnx

    from autoglm_jax.checkpoint.orbax_io import save_checkpoint
    from autoglm_jax.quant import get_scheme, quantize_model, to_storable
    from tests.hf_tiny import save_tiny

    src = tmp_path / "hf"
    save_tiny("Glm4ForCausalLM", src, seed=12)
    config, model, _ = load_model(str(src), jnp.float32)
    floats = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    scheme, rng = get_scheme("int4-g64"), np.random.default_rng(0)
    scaled = {}
    for path in ("layers/qkv", "layers/down"):
        w = jnp.asarray(floats[path])
        a = jnp.asarray(np.exp(rng.normal(size=w.shape[:-1]) * 0.5), jnp.float32)  # [L, K]
        scaled[path] = dataclasses.replace(scheme.quantize(w / a[..., None]), in_scales=a)
    quantize_model(model, "int4-g64", scaled)
    params, manifest = to_storable(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert "in_scales" in params["layers"]["qkv"] and "in_scales" not in params["layers"]["o"]
    out = str(tmp_path / "orbax")
    save_checkpoint(out, config, params, extra_metadata={"quantization": {"scheme": "int4-g64", "weights": manifest}})

    _, restored, _ = load_model(out, jnp.float32, quantization="int4-g64")
    got = flatten(nnx.to_pure_dict(nnx.state(restored, nnx.Param)))
    for path, weight in scaled.items():
        np.testing.assert_array_equal(got[path].in_scales, weight.in_scales)
        np.testing.assert_array_equal(got[path].packed, weight.packed)
    assert got["layers/o"].in_scales is None
    tokens = rng.integers(3, config.vocab_size, 20)
    cache, table = new_cache(config, 20)
    a = forward(restored, tokens, 0, cache, table)[0]
    cache, table = new_cache(config, 20)
    np.testing.assert_allclose(a, forward(model, tokens, 0, cache, table)[0], rtol=1e-5, atol=1e-5)
    dropped = dataclasses.replace(got["layers/qkv"], in_scales=None)  # the scales matter to the logits
    restored.layers.qkv = nnx.Param(dropped)
    cache, table = new_cache(config, 20)
    assert not np.allclose(a, forward(restored, tokens, 0, cache, table)[0], rtol=1e-3, atol=1e-3)


def test_calibrated_convert_stores_calibrated_weights(tmp_path):
    from flax import nnx

    from autoglm_jax.checkpoint.convert import read_calibration_prompts
    from tests.hf_tiny import save_tiny

    src = tmp_path / "hf"
    save_tiny("Glm4ForCausalLM", src, seed=5)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 200, 24).tolist() for _ in range(6)]
    out = convert_checkpoint(str(src), str(tmp_path / "cal"), "float32", quantization="int4-g64",
                             calibration_token_ids=seqs)
    with open(os.path.join(out, "autoglm_metadata.json")) as f:
        calibration = json.load(f)["quantization"]["calibration"]
    assert calibration["sequences"] == 6 and calibration["tokens"] == 6 * 24
    assert calibration["mean_layer_error_calibrated"] < calibration["mean_layer_error_round_to_nearest"]

    config, restored, _ = load_model(out, jnp.float32)
    _, rtn_model, _ = load_model(str(src), jnp.float32, quantization="int4-g64")
    got = flatten(nnx.to_pure_dict(nnx.state(restored, nnx.Param)))
    rtn = flatten(nnx.to_pure_dict(nnx.state(rtn_model, nnx.Param)))
    differs = [path for path in ("layers/qkv", "layers/o", "layers/gate_up", "layers/down")
               if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(rtn[path])))]
    assert differs, "calibration stored the round-to-nearest weights"
    cache, table = new_cache(config, 10)
    assert np.isfinite(forward(restored, seqs[0][:10], 0, cache, table)[0]).all()

    with pytest.raises(ValueError, match="without quantization"):
        convert_checkpoint(str(src), str(tmp_path / "x"), "float32", calibration_token_ids=seqs)
    with pytest.raises(ValueError, match="no tokenizer"):
        convert_checkpoint(str(src), str(tmp_path / "y"), "float32", quantization="int8", calibration_prompts=["hi"])
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_calibration_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "prompts.txt").write_text("first prompt\n\n second \n")
    assert read_calibration_prompts(str(tmp_path / "prompts.txt")) == ["first prompt", "second"]
