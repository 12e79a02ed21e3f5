"""One data-parallel replica as its own OS process (the "process" ``data_parallel_backend``).

Owns: the replica's side of the front/replica protocol — the messages both sides exchange, the
environment a replica process starts with (set by the front before the process starts, so before JAX
starts in it: on GPU ``CUDA_VISIBLE_DEVICES`` = its device group, on CPU ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS`` forcing ``tensor_parallel_size`` host devices; every other variable, NCCL_* included, is
inherited unchanged), and the replica's loop: apply the commands that arrived (add a prepared request,
abort, stop), run ``EngineCore.step()`` while it has work, and report the step's RequestOutputs with its
load. It never waits for the front while it has work; it blocks only when idle. A failure at start-up
or in a step is reported with its traceback before the process exits (the front raises it).
It does not route requests or validate them (``replica_processes``, the front, does both).

Wire format: each ``Connection.send`` carries a list of messages. Front -> replica: ``(ADD,
AddRequest)``, ``(ABORT, request_id)``, ``(STOP, None)``. Replica -> front: ``ReplicaReady`` once, then
``ReplicaReport`` after every step (and after commands that changed nothing else), or ``ReplicaFailed``.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

ADD, ABORT, STOP = "add", "abort", "stop"
METRICS_INTERVAL_S = 0.5  # a replica sends its EngineMetrics snapshot at most this often while busy


class AddRequest(NamedTuple):
    """A request validated by the front; the replica builds its RequestState (``RequestBuilder.build``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    base_seed: int


@dataclasses.dataclass(frozen=True)
class ReplicaReport:
    """A replica's state after one step (or one batch of commands)."""

    replica: int
    outputs: list        # RequestOutputs of the requests this step changed (cumulative, as EngineCore.step)
    load: Any            # balancer.ReplicaLoad
    num_running: int
    num_waiting: int
    num_added: int       # ADD commands applied so far: the front counts the later ones itself
    metrics: dict | None  # EngineMetrics.snapshot, at most every METRICS_INTERVAL_S and when going idle


@dataclasses.dataclass(frozen=True)
class ReplicaReady:
    """Sent once the replica's engine is built (weights loaded, steps compiled when warmup is on)."""

    replica: int
    request_builder: Any  # core.RequestBuilder with tokenizer=None (the front loads its own)
    model_config: Any
    num_usable_pages: int
    devices: str
    report: ReplicaReport


@dataclasses.dataclass(frozen=True)
class ReplicaFailed:
    replica: int
    traceback: str


class MessageSender:
    """Sends messages over a Connection from a background thread, batched into one list per send, so that
    ``put`` never blocks: a replica keeps stepping while the front is busy, and the front keeps routing
    while a replica compiles. If the other side is gone, messages are dropped (its death is noticed
    through the process sentinel or EOF, not here)."""

    _CLOSE = object()

    def __init__(self, connection: Connection, name: str):
        self._connection = connection
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message) -> None:
        self._queue.put(message)

    def close(self, timeout: float | None = 30.0) -> None:
        """Sends what is queued, then closes the connection."""
        self._queue.put(self._CLOSE)
        self._thread.join(timeout)
        self._connection.close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = any(message is self._CLOSE for message in batch)
            messages = [message for message in batch if message is not self._CLOSE]
            try:
                if messages:
                    self._connection.send(messages)
            except (OSError, EOFError):  # the other side is gone
                return
            if closing:
                return


def replica_environment(platform: str, tensor_parallel_size: int, gpu_ids: list[str] | None,
                        environ: dict[str, str]) -> dict[str, str]:
    """The variables that restrict a replica process to its devices (everything else is inherited).

    platform: "gpu" (``gpu_ids``: the CUDA device ids of this replica's group) or "cpu" (the replica
    gets ``tensor_parallel_size`` host devices of its own). environ: the front's environment."""
    if platform == "gpu":
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}
    if platform != "cpu":
        raise ValueError(f"replica processes run on gpu or cpu, not {platform!r}: use data_parallel_backend='thread'")
    flags = [flag for flag in environ.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={tensor_parallel_size}")
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}


def run_replica(replica: int, config, platform: str, commands: Connection, reports: Connection) -> None:
    """Entry point of a replica process (a multiprocessing "spawn" target). config: the EngineConfig of
    this replica (data_parallel_size=1); platform: what JAX must run on here ("gpu" or "cpu")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the front, which stops the replicas
    sender = MessageSender(reports, f"replica-{replica}-reports")
    try:
        core = _build_core(replica, config, platform)
        import jax

        sender.put(ReplicaReady(replica, dataclasses.replace(core.request_builder, tokenizer=None), core.model_config,
                                core.allocator.num_usable_pages, repr(jax.local_devices()),
                                _report(core, replica, [], 0, core.metrics.snapshot(time.monotonic()))))
        _serve(core, replica, commands, sender)
    except EOFError:  # the front is gone: nobody to report to
        pass
    except BaseException:
        sender.put(ReplicaFailed(replica, traceback.format_exc()))
        sender.close()
        raise SystemExit(1)
    sender.close()


def _build_core(replica: int, config, platform: str):
    import jax

    from autoglm_jax.engine.core import EngineCore

    devices = jax.local_devices()
    if jax.default_backend() != platform or len(devices) != config.tensor_parallel_size:
        raise RuntimeError(
            f"replica {replica} should see {config.tensor_parallel_size} {platform} device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}) but JAX sees {devices}")
    return EngineCore(config)


def _serve(core, replica: int, commands: Connection, sender: MessageSender) -> None:
    """Steps while there is work; applies commands between steps; returns on STOP."""
    num_added, last_metrics = 0, time.monotonic()
    while True:
        batches = [] if core.has_unfinished_requests() else [commands.recv()]  # idle: wait for the front
        while commands.poll():
            batches.append(commands.recv())
        for kind, payload in (command for batch in batches for command in batch):
            if kind == STOP:
                return
            if kind == ADD:
                core.enqueue_request(core.request_builder.build(*payload))
                num_added += 1
            elif kind == ABORT:
                core.abort(payload)
        outputs = core.step() if core.has_unfinished_requests() else []
        now, snapshot = time.monotonic(), None
        if now - last_metrics >= METRICS_INTERVAL_S or not core.has_unfinished_requests():
            snapshot, last_metrics = core.metrics.snapshot(now), now
        sender.put(_report(core, replica, outputs, num_added, snapshot))


def _report(core, replica: int, outputs: list, num_added: int, metrics: dict | None) -> ReplicaReport:
    from autoglm_jax.parallel.replicas import replica_load

    return ReplicaReport(replica, outputs, replica_load(core), core.scheduler.num_running,
                         core.scheduler.num_waiting, num_added, metrics)
