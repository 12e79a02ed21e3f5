"""Placing a model's weights straight into their tensor-parallel shards.

Owns: building a ``CausalLM`` whose parameters are global arrays in the TP layout (``layout``),
sharded over a ("tp",) mesh, with ``tensor_parallel_axis`` set so its forward runs per shard inside
``shard_map``. Host checkpoints are regrouped on the host and each device receives only its slice
(``jax.make_array_from_callback``: no full device copy, and in a multi-host run each process fills
only its own devices). Random presets are made on the devices, already sharded, with the same values
as the one-device model of the same seed.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.decoder import CausalLM
from autoglm_jax.parallel.layout import param_specs, to_tp_layout
from autoglm_jax.parallel.mesh import TP_AXIS, local_device
from autoglm_jax.parallel.shard_config import shard_model_config, tp_model_config


def param_shardings(tree, config: ModelConfig, mesh: Mesh):
    """NamedSharding of every parameter of ``tree`` (pure dict or nnx.State) in the TP layout."""
    specs = param_specs(tree, config, mesh.shape[TP_AXIS])
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def build_sharded_model(config: ModelConfig, params: dict | None, dtype, attention_backend: str, seed: int,
                        mesh: Mesh) -> CausalLM:
    """A CausalLM over ``mesh`` (axis "tp") in the TP layout; ``params`` (standard layout, host) is
    consumed, or random weights (seed) are made on the devices when it is None."""
    tp = mesh.shape[TP_AXIS]
    layout_config = tp_model_config(config, tp)
    abstract = nnx.eval_shape(lambda: CausalLM(layout_config, param_dtype=dtype, attention_backend=attention_backend,
                                               rngs=nnx.Rngs(0)))
    abstract.tensor_parallel_axis = TP_AXIS
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(nnx.to_pure_dict(state), config, mesh)
    if params is None:
        def make():
            model = CausalLM(config, param_dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(seed))
            return to_tp_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config, tp)

        placed = jax.jit(make, out_shardings=shardings)()
    else:
        host = to_tp_layout(_host_tree(params, dtype), config, tp)
        placed = jax.tree.map(_place, host, shardings)
    nnx.replace_by_pure_dict(state, placed)
    return nnx.merge(graphdef, state)


def _host_tree(tree: dict, dtype) -> dict:
    """Numpy copy of a parameter tree in ``dtype`` (leaves popped from the input as they are read)."""
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        out[key] = _host_tree(value, dtype) if isinstance(value, dict) else np.asarray(value).astype(dtype)
    return out


def _place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def per_device_plan(config: ModelConfig, mesh: Mesh) -> tuple[ModelConfig, jax.Device]:
    """(config whose KV page size is one device's share, a local device of the mesh) for sizing the
    KV pool from that device's free memory (``engine.memory.plan_num_pages``)."""
    tp = mesh.shape[TP_AXIS]
    return shard_model_config(tp_model_config(config, tp), tp), local_device(mesh)
