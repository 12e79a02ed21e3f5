"""Our own checkpoints: a parameter tree in Orbax format plus the ModelConfig and metadata as JSON.

Owns: the on-disk layout below, writing it, and restoring it completely or not at all.

    <path>/params/                 orbax-checkpoint StandardCheckpointer tree (OCDBT + zarr)
    <path>/autoglm_metadata.json   format version, dtype(s), per-array shape/dtype/checksum, extra
    <path>/autoglm_config.json     dataclasses.asdict(ModelConfig); written last = "complete"

``params`` is the model's ``nnx.State.to_pure_dict()``: nested ``dict[str, ...]`` whose leaves are
jax or numpy arrays. Tensorstore reports missing or truncated array files itself; a flipped bit
inside a compressed chunk would decode silently, so every array's checksum (computed on device,
see ``array_checksum``) is stored at save and verified at restore.

Does not own: building a model from the tree (``checkpoint.loader``), converting other formats.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.config import ModelConfig
from autoglm_jax.tree_paths import flatten, unflatten

FORMAT_VERSION = 1
CONFIG_FILE = "autoglm_config.json"
METADATA_FILE = "autoglm_metadata.json"
PARAMS_DIR = "params"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by ``save_checkpoint`` (config and params both present)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


# ---- save ----------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, config: ModelConfig, params: dict,
                    extra_metadata: dict | None = None) -> None:
    """Writes ``params`` (nested dict of arrays) with Orbax, then metadata, then the config.

    ``extra_metadata`` must be JSON-serialisable; its ``"quantization"`` entry, if any, is also
    recorded at the top level of the metadata file. ``path`` must not exist or be an empty directory.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"checkpoint path {path} already exists and is not an empty directory")
    extra = dict(extra_metadata or {})
    try:
        extra_json = json.loads(json.dumps(extra))
    except TypeError as e:
        raise ValueError(f"extra_metadata must be JSON-serialisable: {e}") from e
    leaves = flatten(params)
    arrays = {}
    for name, leaf in leaves.items():
        dtype = jnp.dtype(leaf.dtype)
        if dtype.itemsize > 4:
            raise ValueError(f"parameter {name!r} has dtype {dtype}; 64-bit arrays are not supported")
        arrays[name] = {"shape": list(leaf.shape), "dtype": dtype.name, "checksum": array_checksum(leaf)}

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR), params)
    checkpointer.wait_until_finished()
    checkpointer.close()

    float_dtypes = sorted({a["dtype"] for a in arrays.values() if jnp.issubdtype(jnp.dtype(a["dtype"]), jnp.floating)})
    metadata = {
        "format_version": FORMAT_VERSION,
        "dtype": float_dtypes[0] if len(float_dtypes) == 1 else "mixed: " + ", ".join(float_dtypes),
        "num_elements": int(sum(np.prod(a["shape"]) for a in arrays.values())),
        "quantization": extra_json.get("quantization"),
        "arrays": arrays,
        "extra": extra_json,
    }
    _write_json(os.path.join(path, METADATA_FILE), metadata)
    _write_json(os.path.join(path, CONFIG_FILE), dataclasses.asdict(config))


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


# ---- restore -------------------------------------------------------------------------------------


def restore_checkpoint(path: str | os.PathLike, dtype=None, shardings=None) -> tuple[ModelConfig, dict, dict]:
    """(config, params, extra_metadata) from a ``save_checkpoint`` directory.

    ``dtype``: cast floating-point arrays to it after verification (integer arrays, e.g. quantized
    weights, keep theirs); peak device memory is the checkpoint in its saved dtypes plus one cast
    array. ``shardings``: one ``jax.sharding.Sharding`` for every array, or a tree of them shaped
    like ``params``; default: the first device. Raises CheckpointError naming the path for a missing
    directory/file, corrupted or truncated array data, or a tree that differs from the metadata.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"Orbax checkpoint directory not found: {path}")
    config = _read_config(os.path.join(path, CONFIG_FILE))
    metadata = _read_json(os.path.join(path, METADATA_FILE))
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version={metadata.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"Orbax checkpoint {path} has no {PARAMS_DIR}/ directory")
    arrays = metadata.get("arrays")
    if not isinstance(arrays, dict) or not arrays:
        raise CheckpointError(f"{os.path.join(path, METADATA_FILE)} lists no arrays")
    target = unflatten({
        name: jax.ShapeDtypeStruct(tuple(a["shape"]), jnp.dtype(a["dtype"]), sharding=sharding)
        for (name, a), sharding in zip(arrays.items(), _leaf_shardings(shardings, list(arrays)))
    })
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(params_dir, target)
    except Exception as e:  # tensorstore raises ValueError / bare Exception on damaged data
        raise CheckpointError(f"cannot restore Orbax checkpoint {path} (corrupted or truncated array data?): "
                              f"{str(e)[:500]}") from e
    finally:
        checkpointer.close()
    flat = flatten(restored)
    if flat.keys() != arrays.keys():
        raise CheckpointError(
            f"Orbax checkpoint {path}: restored arrays {sorted(flat)} differ from metadata {sorted(arrays)}")
    for name, value in flat.items():
        if array_checksum(value) != arrays[name]["checksum"]:
            raise CheckpointError(f"Orbax checkpoint {path}: array {name!r} fails its checksum (corrupted data)")
        if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != jnp.dtype(dtype):
            flat[name] = value.astype(dtype)
            value.delete()
    return config, unflatten(flat), metadata.get("extra", {})


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"Orbax checkpoint is missing {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {path} (truncated or corrupted): {e}") from e


def read_config(checkpoint: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a ``save_checkpoint`` directory, without reading its arrays."""
    return _read_config(os.path.join(os.fspath(checkpoint), CONFIG_FILE))


def _read_config(path: str) -> ModelConfig:
    """ModelConfig from its JSON; lists back to the tuples the frozen dataclass holds."""
    raw = _read_json(path)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise CheckpointError(f"{path} has fields {unknown} that ModelConfig does not know")
    if "eos_token_ids" in raw:
        raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
    if "rope_scaling" in raw:
        raw["rope_scaling"] = tuple((k, _tuples(v)) for k, v in raw["rope_scaling"])
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model config in {path}: {e}") from e


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _leaf_shardings(shardings, names: list[str]) -> list:
    if shardings is None:
        return [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(names)
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * len(names)
    flat = flatten(shardings)
    if flat.keys() != set(names):
        raise ValueError(f"shardings tree has leaves {sorted(flat)}, the checkpoint has {sorted(names)}")
    return [flat[name] for name in names]


# ---- checksum ------------------------------------------------------------------------------------


def array_checksum(x) -> int:
    """A 32-bit position-weighted sum of the array's bits, computed where the array lives.

    sum_i bits_i * w_i mod 2^32 with odd weights w_i: any single flipped bit changes it. Not a
    cryptographic hash; it guards against damaged files, not tampering.
    """
    x = jnp.asarray(x)
    return int(_checksum(x))


@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    if _bits(x.dtype) < 8:  # bool, int4, float4...: widen exactly to one byte (or float32)
        x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating)
                     else jnp.int8 if jnp.issubdtype(x.dtype, jnp.signedinteger) else jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _bits(dtype) -> int:
    if dtype == jnp.bool_:
        return 1
    return jnp.finfo(dtype).bits if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).bits
