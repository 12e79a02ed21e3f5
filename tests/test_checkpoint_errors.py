"""Bad Hugging Face checkpoints fail loudly with errors naming the tensor/file; never a partial load."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.checkpoint.loader import load_model, resolve_model_source
from autoglm_jax.config import UnsupportedModelError
from tests.hf_tiny import save_tiny


@pytest.fixture()
def tiny_dir(tmp_path):
    save_tiny("LlamaForCausalLM", tmp_path)
    return tmp_path


def _rewrite(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(tiny_dir):
    _rewrite(tiny_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\..*k_proj"):
        load_model(str(tiny_dir), dtype=np.float32)


def test_shape_mismatch_is_named(tiny_dir):
    def change(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-1].copy()
    _rewrite(tiny_dir, change)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*shape"):
        load_model(str(tiny_dir), dtype=np.float32)


def test_unexpected_tensor_is_named(tiny_dir):
    _rewrite(tiny_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    with pytest.raises(CheckpointError, match="q_norm"):
        load_model(str(tiny_dir), dtype=np.float32)


def test_truncated_file_is_named(tiny_dir):
    path = os.path.join(tiny_dir, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(str(tiny_dir), dtype=np.float32)


def test_missing_shard_is_named(tiny_dir):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    with open(os.path.join(tiny_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_model(str(tiny_dir), dtype=np.float32)


def test_unknown_architecture_lists_supported(tiny_dir):
    path = os.path.join(tiny_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = ["MixtralForCausalLM"]
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM.*GlmForCausalLM"):
        load_model(str(tiny_dir), dtype=np.float32)


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="not a preset"):
        resolve_model_source("no-such-model")


def test_sharded_checkpoint_loads_identically(tiny_dir, tmp_path_factory):
    """A checkpoint split over two shards with an index gives the same parameters."""
    _, single, _ = load_model(str(tiny_dir), dtype=np.float32)
    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    os.remove(os.path.join(tiny_dir, "model.safetensors"))
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, os.path.join(tiny_dir, file))
    with open(os.path.join(tiny_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: file for file, part in halves.items() for n in part}}, f)
    _, sharded, _ = load_model(str(tiny_dir), dtype=np.float32)
    from flax import nnx
    a, b = nnx.state(single).to_pure_dict(), nnx.state(sharded).to_pure_dict()
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
