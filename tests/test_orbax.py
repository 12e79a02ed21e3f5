"""Orbax checkpoints: bit-exact round trips, config round trip, and damaged checkpoints refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.checkpoint.orbax_io import (
    CONFIG_FILE, METADATA_FILE, PARAMS_DIR, array_checksum, is_orbax_checkpoint, restore_checkpoint,
    save_checkpoint)
from autoglm_jax.config import ModelConfig

CONFIG = ModelConfig.from_preset("tiny-glm4").replace(
    rope_scaling=(("factor", 2.0), ("rope_type", "linear")), eos_token_ids=(1, 5), bos_token_id=3)


def random_params(dtype, seed=0) -> dict:
    """A model-shaped tree: stacked layers [L, ...], globals, an int8 quantized weight."""
    rng = np.random.default_rng(seed)
    L, H, V = 2, 64, 512

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return {
        "embed_tokens": normal(V, H),
        "norm": normal(H),
        "layers": {"qkv": normal(L, H, 128), "o": normal(L, 64, H), "input_norm": normal(L, H),
                   "gate_up": {"kernel": jnp.asarray(rng.integers(-128, 128, (L, H, 256)), jnp.int8),
                               "scale": normal(L, 256)}},
    }


def assert_trees_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), err_msg=str(path))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    params = random_params(dtype, seed=1)
    extra = {"quantization": {"scheme": "int8", "group_size": 128}, "source": "unit-test"}
    save_checkpoint(tmp_path / "ckpt", CONFIG, params, extra)
    assert is_orbax_checkpoint(tmp_path / "ckpt")
    config, restored, got_extra = restore_checkpoint(tmp_path / "ckpt")
    assert config == CONFIG
    assert got_extra == extra
    assert_trees_bit_equal(restored, params)
    meta = json.loads((tmp_path / "ckpt" / METADATA_FILE).read_text())
    assert meta["dtype"] == jnp.dtype(dtype).name and meta["quantization"] == extra["quantization"]


def test_numpy_leaves_restore_as_jax_arrays(tmp_path):
    params = {"w": np.random.default_rng(2).standard_normal((8, 32)).astype(np.float32)}
    save_checkpoint(tmp_path / "ckpt", CONFIG, params)
    _, restored, extra = restore_checkpoint(tmp_path / "ckpt")
    assert isinstance(restored["w"], jax.Array) and extra == {}
    np.testing.assert_array_equal(np.asarray(restored["w"]), params["w"])


def test_restore_casts_floats_only(tmp_path):
    params = random_params(jnp.float32, seed=3)
    save_checkpoint(tmp_path / "ckpt", CONFIG, params)
    _, restored, _ = restore_checkpoint(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert restored["layers"]["gate_up"]["kernel"].dtype == jnp.int8
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    assert_trees_bit_equal(restored, want)


def test_restore_with_sharding(tmp_path):
    params = random_params(jnp.bfloat16, seed=4)
    save_checkpoint(tmp_path / "ckpt", CONFIG, params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    _, restored, _ = restore_checkpoint(tmp_path / "ckpt", shardings=sharding)
    assert all(x.sharding == sharding for x in jax.tree.leaves(restored))
    with pytest.raises(ValueError, match="shardings tree"):
        restore_checkpoint(tmp_path / "ckpt", shardings={"norm": sharding})


def test_checksum_sees_one_flipped_bit():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((33, 17)), jnp.bfloat16)
    bits = np.asarray(x).view(np.uint16).copy()
    bits[20, 3] ^= 1 << 7
    assert array_checksum(x) != array_checksum(jnp.asarray(bits.view(jnp.bfloat16)))
    assert array_checksum(x) != array_checksum(x.T)  # position-dependent


def test_loader_recognises_the_checkpoint(tmp_path):
    from autoglm_jax.checkpoint.loader import resolve_model_source

    save_checkpoint(tmp_path / "ckpt", CONFIG, random_params(jnp.float32))
    assert resolve_model_source(str(tmp_path / "ckpt")).kind == "orbax"


def test_refuses_to_overwrite(tmp_path):
    save_checkpoint(tmp_path / "ckpt", CONFIG, random_params(jnp.float32))
    with pytest.raises(FileExistsError, match="ckpt"):
        save_checkpoint(tmp_path / "ckpt", CONFIG, random_params(jnp.float32))


# ---- damaged checkpoints -------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, CONFIG, random_params(jnp.float32, seed=6))
    return path


def data_files(path):
    """The tensorstore chunk files (ocdbt data directories), largest first."""
    files = [os.path.join(root, f) for root, _, names in os.walk(path / PARAMS_DIR) for f in names
             if os.path.basename(root) == "d"]
    assert files, "no array data files found"
    return sorted(files, key=os.path.getsize, reverse=True)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nowhere"):
        restore_checkpoint(tmp_path / "nowhere")
    assert not is_orbax_checkpoint(tmp_path / "nowhere")


def test_missing_config(saved):
    os.remove(saved / CONFIG_FILE)
    assert not is_orbax_checkpoint(saved)
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        restore_checkpoint(saved)


def test_truncated_config(saved):
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        restore_checkpoint(saved)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax reader tasks
@pytest.mark.parametrize("damage", ["truncate", "remove", "flip_bit"])
def test_damaged_array_data(saved, damage):
    for victim in data_files(saved)[:1]:
        data = bytearray(open(victim, "rb").read())
        if damage == "remove":
            os.remove(victim)
            continue
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        open(victim, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=str(saved)):
        restore_checkpoint(saved)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the damaged-array tests' orbax
def test_removed_params_directory(saved):  # reader tasks, collected in the module's teardown (tests/conftest.py)
    import shutil

    shutil.rmtree(saved / PARAMS_DIR)
    with pytest.raises(CheckpointError, match=PARAMS_DIR):
        restore_checkpoint(saved)
