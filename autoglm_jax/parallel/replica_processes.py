"""Data-parallel serving with one OS process per replica (the "process" ``data_parallel_backend``).

Owns: the front. It starts ``data_parallel_size`` replica processes (``replica_worker``, multiprocessing
"spawn"), each restricted to its own group of ``tensor_parallel_size`` devices before JAX starts in it;
routes each request with ``balancer.pick_replica`` over the loads the replicas last reported plus what
it sent them since (so a burst of adds spreads before any replica reports back); gathers their
RequestOutputs; and turns a replica's failure (its traceback) or death (its exit code) into a
``ReplicaError`` in the caller, never a hang. Each replica steps on its own as soon as it has work:
no GIL shared between replicas, no lockstep. Requests are tokenized and validated here, in the caller,
with the replicas' ``core.RequestBuilder`` (a bad request raises before anything is sent), and seeded
from one generator, so a DP run samples as one engine would.

``ProcessReplicatedEngineCore`` offers what ``LLM``, ``AutoGLMEngine`` and the server use of an
``EngineCore``: add/prepare/enqueue_request, abort, has_unfinished_requests, step, requests, tokenizer,
model_config, max_sequence_length, and ``scheduler`` / ``allocator`` / ``metrics`` summed over the
replicas' latest reports. One host only (multi-host engines are ``parallel.multihost``'s).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import random
import signal
import threading
import types
import weakref
from multiprocessing.connection import wait

from autoglm_jax.checkpoint.loader import resolve_model_source
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.outputs import RequestOutput
from autoglm_jax.parallel.balancer import ReplicaLoad, pick_replica
from autoglm_jax.parallel.mesh import make_mesh
from autoglm_jax.parallel.replica_worker import (
    ABORT, ADD, STOP, AddRequest, MessageSender, ReplicaFailed, ReplicaReady, ReplicaReport, replica_environment,
    run_replica)
from autoglm_jax.parallel.replicas import SchedulerTotals, sequence_pages
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tokenizer_loading import load_tokenizer

log = logging.getLogger(__name__)
STEP_WAIT_S = 0.02  # step() waits at most this long for a replica's next report while requests are in flight
_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
_SPAWN_LOCK = threading.Lock()  # the front's environment is borrowed while a replica process starts


class ReplicaError(RuntimeError):
    """A replica process failed (its traceback) or died (its exit code)."""


def local_platform() -> str:
    """The platform of this process's JAX devices ("gpu", "cpu", ...)."""
    return _local_devices()[0].platform


def _local_devices() -> list:
    """This process's JAX devices. If JAX has not started here yet, it starts without preallocating GPU
    memory (the replica processes need it; they start with the front's original setting)."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "gpu" and os.environ.get(_PREALLOCATE, "true").lower() not in ("false", "0"):
            log.warning("JAX preallocated GPU memory in the data-parallel front before its replicas started; they may "
                        "run out of memory (set %s=false or build the engine before using JAX)", _PREALLOCATE)
        return jax.local_devices()
    with _environment({_PREALLOCATE: "false"}):
        return jax.local_devices()


def replica_device_groups(tensor_parallel_size: int, data_parallel_size: int) -> tuple[str, list[list[str]] | None]:
    """(platform, the CUDA device ids of each replica). On CPU each replica gets host devices of its own
    (None). Raises ValueError when the GPUs are too few or the platform is neither."""
    import jax

    devices = _local_devices()  # first: starts JAX here without preallocating GPU memory
    if jax.process_count() > 1:
        raise ValueError("data_parallel_backend='process' runs on one host; this is a multi-process JAX run")
    platform = devices[0].platform
    if platform != "gpu":
        replica_environment(platform, tensor_parallel_size, None, {})  # ValueError for other platforms
        return platform, None
    visible = [i.strip() for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip()]
    cuda_id = (lambda d: visible[d.local_hardware_id]) if visible else (lambda d: str(d.local_hardware_id))
    mesh = make_mesh(tensor_parallel_size, data_parallel_size, sorted(devices, key=lambda d: d.id))
    return platform, [[cuda_id(d) for d in row] for row in mesh.devices]


@contextlib.contextmanager
def _environment(changes: dict[str, str]):
    """os.environ with ``changes`` applied inside the block (a started process inherits it)."""
    with _SPAWN_LOCK:
        saved = {name: os.environ.get(name) for name in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@dataclasses.dataclass
class RemoteRequest:
    """The front's view of a request in a replica process: where it runs and its latest output."""

    request_id: str
    replica: int
    add_number: int  # the replica's count of applied adds once it holds this request
    latest: RequestOutput

    def output(self) -> RequestOutput:
        return self.latest

    def abort(self) -> None:
        outputs = [c if c.finish_reason is not None else dataclasses.replace(c, finish_reason="abort")
                   for c in self.latest.outputs]
        self.latest = dataclasses.replace(self.latest, outputs=outputs, finished=True)


class _Replica:
    """The front's handle on one replica process: its pipes, its latest report, the adds sent since."""

    def __init__(self, index: int, config: EngineConfig, platform: str, gpu_ids: list[str] | None):
        context = multiprocessing.get_context("spawn")
        command_reader, command_writer = context.Pipe(duplex=False)
        self.reports, report_writer = context.Pipe(duplex=False)
        self.index = index
        self.process = context.Process(target=run_replica, name=f"autoglm-dp-replica-{index}", daemon=True,
                                       args=(index, config, platform, command_reader, report_writer))
        with _environment(replica_environment(platform, config.tensor_parallel_size, gpu_ids, dict(os.environ))):
            self.process.start()
        command_reader.close()  # the replica's ends: EOF on either side then means the other is gone
        report_writer.close()
        self.commands = MessageSender(command_writer, f"replica-{index}-commands")
        self.ready: ReplicaReady | None = None
        self.report: ReplicaReport | None = None
        self.metrics: dict | None = None  # the latest EngineMetrics snapshot
        self.num_sent = 0
        self._unseen: collections.deque[tuple[int, int, int]] = collections.deque()  # (add number, pages, sequences)
        self._unseen_pages = self._unseen_sequences = 0

    def send_add(self, add: AddRequest, pages: int, sequences: int) -> int:
        """Sends a request; returns its add number."""
        self.num_sent += 1
        self._unseen.append((self.num_sent, pages, sequences))
        self._unseen_pages += pages
        self._unseen_sequences += sequences
        self.commands.put((ADD, add))
        return self.num_sent

    def absorb(self, report: ReplicaReport) -> None:
        self.report = report
        self.metrics = report.metrics if report.metrics is not None else self.metrics
        while self._unseen and self._unseen[0][0] <= report.num_added:
            _, pages, sequences = self._unseen.popleft()
            self._unseen_pages -= pages
            self._unseen_sequences -= sequences

    def load(self) -> ReplicaLoad:
        """The last reported load plus the requests sent since."""
        load = self.report.load
        return ReplicaLoad(free_pages=load.free_pages, committed_pages=load.committed_pages + self._unseen_pages,
                           num_requests=load.num_requests + self._unseen_sequences)

    @property
    def num_waiting(self) -> int:
        return self.report.num_waiting + self._unseen_sequences

    def request_stop(self) -> None:
        """Asks a ready replica to stop after its current step; one still starting is terminated."""
        if self.ready is None:
            self.process.terminate()
        self.commands.put((STOP, None))
        self.commands.close(timeout=5.0)

    def wait_stopped(self, timeout: float = 30.0) -> None:
        """Joins the process; terminates, then kills it if it does not end in time."""
        self.process.join(timeout)
        for kill in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                kill()
                self.process.join(5.0)
        self.reports.close()


def _stop_replicas(replicas: list[_Replica]) -> None:
    for replica in replicas:
        replica.request_stop()
    for replica in replicas:
        replica.wait_stopped()


class ProcessReplicatedEngineCore:
    """``data_parallel_size`` replica processes of ``tensor_parallel_size`` devices each, one front.
    Not thread-safe, as ``EngineCore``: one caller at a time (``prepare_request`` from any thread)."""

    def __init__(self, config: EngineConfig | dict | None = None, **overrides):
        self.config = cfg = EngineConfig.from_dict(config, **overrides)
        platform, groups = replica_device_groups(cfg.tensor_parallel_size, cfg.data_parallel_size)
        replica_config = dataclasses.replace(cfg, data_parallel_size=1)
        self._replicas: list[_Replica] = []
        self._closer = weakref.finalize(self, _stop_replicas, self._replicas)  # at close(), collection or exit
        self._requests: dict[str, RemoteRequest] = {}
        self._arrived: dict[str, RequestOutput] = {}  # outputs not yet returned by step(), latest per request
        self._failure: str | None = None
        self._ids = itertools.count()
        self._seed_rng = random.Random(cfg.seed)
        try:
            for index in range(cfg.data_parallel_size):
                self._replicas.append(_Replica(index, replica_config, platform, groups and groups[index]))
            self.tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(cfg.tokenizer,
                                                                                 resolve_model_source(cfg.model))
            while any(replica.ready is None for replica in self._replicas):
                self._receive(timeout=1.0)
        except BaseException:
            self.close()
            raise
        ready = self._replicas[0].ready
        self.model_config = ready.model_config
        self._builder = dataclasses.replace(ready.request_builder, tokenizer=self.tokenizer)
        self.max_sequence_length = self._builder.max_sequence_length
        log.info("data-parallel replica processes: %s", "; ".join(
            f"{r.index}: pid {r.process.pid}, {r.ready.devices}" for r in self._replicas))

    # ------------------------------------------------------------------ state, summed over the replicas
    @property
    def requests(self) -> types.MappingProxyType:
        """Unfinished requests (read-only view: id -> RemoteRequest, whose ``output()`` is the latest)."""
        return types.MappingProxyType(self._requests)

    @property
    def scheduler(self) -> SchedulerTotals:
        return SchedulerTotals(sum(r.report.num_running for r in self._replicas),
                               sum(r.num_waiting for r in self._replicas))

    @property
    def allocator(self) -> "AllocatorTotals":
        return AllocatorTotals(sum(r.report.load.free_pages for r in self._replicas),
                               sum(r.ready.num_usable_pages for r in self._replicas), self.config.page_size)

    @property
    def metrics(self) -> "MetricsTotals":
        return MetricsTotals([r.metrics for r in self._replicas])

    def loads(self) -> list[ReplicaLoad]:
        return [replica.load() for replica in self._replicas]

    @property
    def replica_pids(self) -> list[int]:
        return [replica.process.pid for replica in self._replicas]

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Validates here (ValueError / TypeError: nothing is sent), then sends it to a replica."""
        state = self.prepare_request(prompt, params, request_id)
        self.enqueue_request(state)
        return state

    def prepare_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Tokenizes and validates (any thread); ``enqueue_request`` then sends it to a replica."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return self._builder.prepare(prompt, params, request_id, self._seed_rng)

    def enqueue_request(self, state) -> None:
        """Sends a prepared request (a RequestState) to the replica ``pick_replica`` chooses."""
        self._receive(timeout=0.0)  # the freshest loads; raises if a replica failed
        if state.request_id in self._requests:
            raise ValueError(f"request_id {state.request_id!r} is already in use")
        index = pick_replica(self.loads())
        params, num_prompt_tokens = state.params, len(state.prompt_token_ids)
        pages = len(state.sequences) * sequence_pages(num_prompt_tokens, params.max_tokens, self.max_sequence_length,
                                                      self.config.page_size)
        add = AddRequest(state.request_id, state.prompt, list(state.prompt_token_ids), params, state.sequences[0].seed)
        add_number = self._replicas[index].send_add(add, pages, len(state.sequences))
        self._requests[state.request_id] = RemoteRequest(state.request_id, index, add_number, state.output())

    def abort(self, request_id: str) -> bool:
        """Aborts a request; its output is final (finish_reason "abort") at once. False if unknown/finished."""
        remote = self._requests.pop(request_id, None)
        if remote is None:
            return False
        self._replicas[remote.replica].commands.put((ABORT, request_id))
        self._arrived.pop(request_id, None)
        remote.abort()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """The outputs that arrived since the last call (each request's latest, cumulative). While requests
        are in flight and none has arrived, waits up to STEP_WAIT_S for a replica's next report."""
        self._receive(timeout=STEP_WAIT_S if self._requests and not self._arrived else 0.0)
        outputs, self._arrived = list(self._arrived.values()), {}
        return outputs

    def close(self) -> None:
        """Stops the replica processes (idempotent; also runs when the front is collected or at exit)."""
        self._closer()
        self._failure = self._failure or "the data-parallel front is closed"

    # ------------------------------------------------------------------ reports
    def _receive(self, timeout: float) -> None:
        """Absorbs every message that has arrived, waiting up to ``timeout`` s for the first one."""
        if self._failure is not None:
            raise ReplicaError(self._failure)
        by_handle = {r.reports: r for r in self._replicas} | {r.process.sentinel: r for r in self._replicas}
        for handle in wait(list(by_handle), timeout):
            replica = by_handle[handle]
            self._drain(replica)
            if handle == replica.process.sentinel:  # exited without a traceback (killed, crashed)
                self._fail(replica, None)

    def _drain(self, replica: _Replica) -> None:
        try:
            while replica.reports.poll():
                for message in replica.reports.recv():
                    self._absorb(replica, message)
        except (EOFError, OSError):
            self._fail(replica, None)

    def _absorb(self, replica: _Replica, message) -> None:
        if isinstance(message, ReplicaFailed):
            self._fail(replica, message.traceback)
        report = message.report if isinstance(message, ReplicaReady) else message
        if isinstance(message, ReplicaReady):
            replica.ready = message
        replica.absorb(report)
        for output in report.outputs:
            remote = self._requests.get(output.request_id)
            if remote is None or remote.replica != replica.index or report.num_added < remote.add_number:
                continue  # aborted, or an earlier request under the same id
            remote.latest = self._arrived[output.request_id] = output
            if output.finished:
                del self._requests[output.request_id]

    def _fail(self, replica: _Replica, traceback: str | None) -> None:
        """Raises (now and at every later call) the replica's traceback, or how its process ended."""
        process = replica.process
        message = f"data-parallel replica {replica.index} (pid {process.pid}) failed:\n{traceback}"
        if traceback is None:
            process.join(5.0)
            code = process.exitcode
            message = f"data-parallel replica {replica.index} (pid {process.pid}) exited with code {code}"
            if code is not None and code < 0:
                message += f" (killed by {signal.Signals(-code).name}"
                message += ": out of host memory?)" if -code == signal.SIGKILL else ")"
        self._failure = message
        raise ReplicaError(message)


@dataclasses.dataclass(frozen=True)
class AllocatorTotals:
    """KV pages of all replicas as of their latest reports (what the server's gauges read)."""

    num_free: int
    num_usable_pages: int
    page_size: int

    @property
    def utilization(self) -> float:
        return 1.0 - self.num_free / self.num_usable_pages


class MetricsTotals:
    """The replicas' latest ``EngineMetrics.snapshot`` dicts as one: counts and rates summed, KV
    utilization averaged; latency summaries: mean weighted by finished requests, percentiles and max the
    worst replica's. Each replica snapshots at most every ``METRICS_INTERVAL_S`` s and when going idle."""

    def __init__(self, snapshots: list[dict]):
        self.snapshots = snapshots  # per replica

    def snapshot(self, now: float | None = None) -> dict:
        del now  # the replicas' own clocks, at their last report
        snapshots, merged = self.snapshots, {}
        weights = [s["num_finished"] for s in snapshots]
        for key, first in snapshots[0].items():
            values = [s[key] for s in snapshots]
            if key == "kv_cache_utilization":
                merged[key] = sum(values) / len(values)
            elif isinstance(first, (int, float)):
                merged[key] = sum(values)
            else:
                merged[key] = _merge_summaries(values, weights)
        return merged


def _merge_summaries(summaries: list[dict | None], weights: list[int]) -> dict | None:
    present = [(s, max(w, 1)) for s, w in zip(summaries, weights) if s is not None]
    if not present:
        return None
    total = sum(w for _, w in present)
    merged = {key: max(s[key] for s, _ in present) for key in present[0][0]}
    merged["mean"] = sum(s["mean"] * w for s, w in present) / total
    return merged
