"""The engine's jitted step functions run as one program per tensor-parallel shard (``jax.shard_map``).

Owns: the in/out partition specs of the serving state and of the step inputs, and the wrapper that
puts ``engine.step_functions.mixed_step`` / ``decode_loop`` under shard_map over the "tp" axis. Inside,
each shard runs the whole step on its weight slice and KV heads (Pallas kernels included); the model's
collectives (``collectives``) make the hidden states and logits identical on every shard, so the
sampler runs replicated and its outputs leave as one replicated value.

    KV pools   [L, P, page, Nkv', D]  split on axis 3 ("tp")
    sampler slot state, step inputs and outputs   replicated
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.device_state import DeviceState
from autoglm_jax.engine.step_functions import decode_loop, mixed_step
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.parallel.layout import KV_CACHE_SPEC, param_specs
from autoglm_jax.parallel.mesh import TP_AXIS
from autoglm_jax.parallel.shard_config import tp_model_config

STATE_SPECS = DeviceState(kv=KVCache(k=KV_CACHE_SPEC, v=KV_CACHE_SPEC), output_counts=P(), prompt_mask=P())


def sharded_device_state(layout_config: ModelConfig, num_pages: int, page_size: int, num_slots: int, dtype,
                         mesh: Mesh) -> DeviceState:
    """Zeroed serving state over ``mesh``: KV heads split over "tp", sampler slot state replicated.
    ``layout_config`` is ``shard_config.tp_model_config`` of the model (KV heads replicated up to tp)."""
    kv = KVCache.create(layout_config, num_pages, page_size, dtype, sharding=NamedSharding(mesh, KV_CACHE_SPEC))
    replicated = NamedSharding(mesh, P())
    zeros = lambda shape, dt: jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=replicated)()  # noqa: E731
    shape = (num_slots, layout_config.vocab_size)
    return DeviceState(kv=kv, output_counts=zeros(shape, jnp.int32), prompt_mask=zeros(shape, bool))


def shard_step(step_fn, graphdef, mesh: Mesh, params_specs):
    """``step_fn(graphdef, params, state, inp, **static)`` -> the same signature without graphdef, each
    call running per shard under shard_map. ``params_specs``: PartitionSpec tree of the parameters."""
    def call(params, state, inp, **static):
        body = functools.partial(step_fn, graphdef, **static)
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(params_specs, STATE_SPECS, P()),
                               out_specs=(STATE_SPECS, P()), check_vma=False)
        return mapped(params, state, inp)

    call.__name__ = f"sharded_{getattr(step_fn, '__name__', 'step')}"
    return call


def tensor_parallel_parts(graphdef, params, config: ModelConfig, mesh: Mesh, *, num_pages: int, page_size: int,
                          num_slots: int, cache_dtype):
    """What ``engine.runner.ModelRunner`` needs to serve over a ("tp",) mesh: (sharded DeviceState,
    mixed step, decode loop), the steps with ``(params, state, inp, **static)`` signatures.
    ``config`` is the model's own config; ``params`` its TP-layout parameters (``placement``)."""
    tp = mesh.shape[TP_AXIS]
    specs = param_specs(params, config, tp)
    state = sharded_device_state(tp_model_config(config, tp), num_pages, page_size, num_slots, cache_dtype, mesh)
    return state, shard_step(mixed_step, graphdef, mesh, specs), shard_step(decode_loop, graphdef, mesh, specs)


def replicate_inputs(tree, mesh: Mesh):
    """Step inputs (host-built, identical on every process) as arrays replicated over ``mesh``."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda _: np.asarray(x)), tree)
