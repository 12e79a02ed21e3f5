"""Run Mosaic GPU kernels on a machine without a GPU (the GPU interpreter), for tests and CI.

Owns: the one place that touches jax's private GPU-interpreter API (jax 0.11.2). It does not own
any kernel. Inside ``gpu_interpret()`` every ``plgpu.kernel`` traced runs on CPU, simulating
shared memory, TMA copies, barriers and warpgroups; freshly allocated buffers are NaN-filled and
out-of-bounds reads raise, so unwritten outputs and bad indexing show up in tests. An abstract
H100 mesh is installed so kernels that ask for the device kind or SM count see a Hopper card.

Each warpgroup of a CTA runs as its own program on the CPU client's thread pool and blocks in barrier waits, so
the pool needs a thread per warpgroup: with one thread a core (2 here) a three-warpgroup kernel can deadlock.
Set ``PJRT_NPROC`` (read once, when jax creates its CPU client) before the first jax computation, as
``tests/conftest.py`` does.

If jax moves these private names, only this file changes.
"""

from __future__ import annotations

import contextlib

import jax
from jax._src import config
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode

INTERPRETED_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
INTERPRETED_NUM_SMS = 8  # few simulated SMs keep persistent-grid kernels fast on CPU


@contextlib.contextmanager
def gpu_interpret(detect_races: bool = False):
    """Context manager: Mosaic GPU kernels traced inside it run in the CPU interpreter."""
    mesh = jax.sharding.AbstractMesh(
        (), (),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind=INTERPRETED_DEVICE_KIND, platform="gpu", num_cores=INTERPRETED_NUM_SMS
        ),
    )
    params = InterpretGPUParams(detect_races=detect_races, uninitialized_memory="nan", out_of_bounds_reads="raise")
    with jax.sharding.use_abstract_mesh(mesh), force_gpu_interpret_mode(params):
        try:
            yield
        except Exception:
            reset_gpu_interpret_mode_state()  # the interpreter needs this after a failed kernel
            raise



def interpreting() -> bool:
    """Whether kernels traced now run in the GPU interpreter (inside ``gpu_interpret()``), for the few
    kernel features it cannot run (e.g. a wgmma operand in registers) that a kernel must route around."""
    return isinstance(config.pallas_tpu_interpret_mode_context_manager.value, InterpretGPUParams)
