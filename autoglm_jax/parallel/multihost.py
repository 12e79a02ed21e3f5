"""One engine over the devices of several hosts: the scheduler runs on process 0, which broadcasts
each step's plan; every process runs the same jitted step on the global mesh.

Owns: the plan broadcast (a pickled ``(SchedulerOutput, rows)`` pair sent with
``multihost_utils.broadcast_one_to_all`` as a length then a byte buffer padded to a power of two, so
few shapes compile) and the two roles: ``lead(core)`` on process 0 makes every ``runner.execute``
broadcast its plan first; ``follow(core)`` on the others executes received plans until ``stop``.
Requests, tokenizer work and outputs stay on process 0. Every process must build its ``EngineCore``
with the same settings (same warmup calls, same compiled steps, in the same order).
"""

from __future__ import annotations

import pickle

import jax
import numpy as np
from jax.experimental import multihost_utils

from autoglm_jax.engine.core import EngineCore
from autoglm_jax.parallel.mesh import make_mesh, replica_meshes

_MIN_BUFFER = 1024


def global_tp_mesh():
    """A ("tp",) mesh over every device of every process (one replica spanning the hosts)."""
    return replica_meshes(make_mesh(jax.device_count(), 1))[0]


def broadcast_plan(plan) -> object:
    """Process 0's ``plan`` (any picklable value; None = stop) on every process."""
    leader = jax.process_index() == 0
    payload = pickle.dumps(plan) if leader else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(payload), np.int32)))
    width = max(_MIN_BUFFER, 1 << (size - 1).bit_length())
    buffer = np.zeros(width, np.uint8)
    if leader:
        buffer[:size] = np.frombuffer(payload, np.uint8)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return pickle.loads(buffer[:size].tobytes())


class _BroadcastingRunner:
    """Process 0's runner: each ``execute`` first sends its plan to the followers."""

    def __init__(self, runner):
        self._runner = runner

    def execute(self, output, rows):
        if output.scheduled:  # an empty step runs nothing on the device: nothing to mirror
            broadcast_plan((output, rows))
        return self._runner.execute(output, rows)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def lead(core: EngineCore) -> EngineCore:
    """Makes process 0's ``core`` broadcast every step's plan; drive it as usual, then ``stop()``."""
    if jax.process_index() != 0:
        raise RuntimeError(f"lead() runs on process 0, this is process {jax.process_index()}")
    core.runner = _BroadcastingRunner(core.runner)
    return core


def stop() -> None:
    """Process 0: tells the followers to return from ``follow``."""
    broadcast_plan(None)


def follow(core: EngineCore) -> int:
    """Processes 1..N-1: run process 0's plans on the shared mesh until it calls ``stop``; returns
    the number of steps run."""
    steps = 0
    while (plan := broadcast_plan(None)) is not None:
        core.runner.execute(*plan)
        steps += 1
    return steps
