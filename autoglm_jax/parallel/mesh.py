"""Device meshes for serving: a global ("dp", "tp") mesh and one 1-D "tp" mesh per data-parallel replica.

Owns: checking that tensor_parallel_size x data_parallel_size matches the devices, and slicing the
devices into replica groups. Devices of one replica are neighbours in ``jax.devices()`` order (on a
GPU host: NVLink peers; across hosts: process-major, so a replica spans hosts only when tp does).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DP_AXIS, TP_AXIS = "dp", "tp"


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh of shape [dp, tp] over the first dp * tp devices (all devices when ``devices`` is None).

    Raises ValueError naming the sizes when they are not positive ints or need more devices than exist.
    """
    for name, value in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * data_parallel_size
    if needed > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} = {needed} "
            f"devices, but only {len(devices)} are available ({devices[0].platform})")
    grid = np.asarray(devices[:needed], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, (DP_AXIS, TP_AXIS))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One 1-D ("tp",) mesh per row of a ("dp", "tp") mesh: the devices of each engine replica."""
    if mesh.axis_names != (DP_AXIS, TP_AXIS):
        raise ValueError(f"expected a mesh with axes {(DP_AXIS, TP_AXIS)}, got {mesh.axis_names}")
    return [Mesh(row, (TP_AXIS,)) for row in mesh.devices]


def engine_mesh(tensor_parallel_size: int, data_parallel_size: int) -> Mesh | None:
    """The ("tp",) mesh of ONE engine replica when tensor parallelism is on, else None (one device).

    Raises ValueError for data_parallel_size > 1: replicas are built by ``parallel.replicas`` (the
    ``LLM`` / ``AutoGLMEngine`` front), each handing its own mesh to an ``EngineCore``.
    """
    if data_parallel_size != 1:
        raise ValueError(f"data_parallel_size={data_parallel_size}: an EngineCore is one replica; build "
                         f"replicas with autoglm_jax.parallel.replicas (LLM and AutoGLMEngine do)")
    if tensor_parallel_size == 1:
        make_mesh(1, 1)  # validates the value
        return None
    return replica_meshes(make_mesh(tensor_parallel_size, 1))[0]


def local_device(mesh: Mesh) -> jax.Device:
    """The first device of ``mesh`` that this process drives (for memory statistics)."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not mine:
        raise ValueError(f"process {jax.process_index()} drives none of the mesh's devices {mesh.devices.tolist()}")
    return mine[0]
