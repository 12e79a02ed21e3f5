"""Data-parallel serving: several ``EngineCore`` replicas on disjoint device groups behind one front.

Owns: choosing the front for ``EngineConfig.data_parallel_backend`` (``replicated_engine_core``: one OS
process per replica in ``replica_processes``, or the threads here), a replica's load as the balancer
sees it (``replica_load``), and the "thread" front: one replica per row of the ("dp", "tp") mesh in
this process, each new request routed with ``balancer.pick_replica`` from the replicas' live KV/queue
state, request ids unique across replicas, and all replicas stepped together from a thread pool (a
replica's jitted step runs while the others are dispatched; the host part of their steps shares the
GIL and each ``step()`` waits for the slowest replica). ``ReplicatedEngineCore`` offers the
``EngineCore`` methods ``LLM`` and ``AutoGLMEngine`` drive (add/prepare/enqueue_request, step, abort,
has_unfinished_requests, requests, scheduler counts). Each replica keeps its own scheduler, KV pool and
compiled steps; nothing is shared between them. ``metrics`` are replica 0's only (not aggregated).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from concurrent.futures import ThreadPoolExecutor

from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.outputs import RequestOutput
from autoglm_jax.parallel.balancer import ReplicaLoad, pages_for, pick_replica
from autoglm_jax.parallel.mesh import make_mesh, replica_meshes
from autoglm_jax.sampling_params import SamplingParams


def data_parallel_backend(config: EngineConfig) -> str:
    """``config.data_parallel_backend`` with "auto" resolved: "process" on GPU, "thread" elsewhere."""
    if config.data_parallel_backend != "auto":
        return config.data_parallel_backend
    from autoglm_jax.parallel.replica_processes import local_platform

    return "process" if local_platform() == "gpu" else "thread"


def replicated_engine_core(config: EngineConfig):
    """The data-parallel front of ``data_parallel_backend(config)``: ``ProcessReplicatedEngineCore``
    (one OS process per replica) or ``ReplicatedEngineCore`` (threads in this process)."""
    if data_parallel_backend(config) == "process":
        from autoglm_jax.parallel.replica_processes import ProcessReplicatedEngineCore

        return ProcessReplicatedEngineCore(config)
    return ReplicatedEngineCore(config)


def sequence_pages(num_prompt_tokens: int, max_tokens: int | None, max_sequence_length: int, page_size: int) -> int:
    """KV pages one sequence occupies once it reaches its length limit."""
    total = max_sequence_length if max_tokens is None else min(max_sequence_length, num_prompt_tokens + max_tokens)
    return pages_for(total, page_size)


def replica_load(core: EngineCore) -> ReplicaLoad:
    """A replica's free KV pages, pages its unfinished requests may still claim, and queue length."""
    scheduler, allocator = core.scheduler, core.allocator
    limit, page = core.max_sequence_length, allocator.page_size
    committed, running = 0, {request.request_id for request in scheduler.running}
    for request in (*scheduler.running, *scheduler.waiting):
        claim = sequence_pages(request.num_prompt_tokens, request.sampling_params.max_tokens, limit, page)
        held = pages_for(request.num_tokens, page) if request.request_id in running else 0
        committed += max(claim - held, 0)
    return ReplicaLoad(free_pages=allocator.num_free, committed_pages=committed,
                       num_requests=scheduler.num_running + scheduler.num_waiting)


class ReplicatedEngineCore:
    """``data_parallel_size`` engine replicas of ``tensor_parallel_size`` devices each in this process,
    one front (the "thread" data_parallel_backend)."""

    def __init__(self, config: EngineConfig | dict | None = None, **overrides):
        self.config = cfg = EngineConfig.from_dict(config, **overrides)
        self.mesh = make_mesh(cfg.tensor_parallel_size, cfg.data_parallel_size)
        self.replicas = [EngineCore(cfg, mesh=mesh) for mesh in replica_meshes(self.mesh)]
        self._owner: dict[str, int] = {}  # request id -> replica index
        self._ids = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=len(self.replicas), thread_name_prefix="dp-replica")

    # The replicas share model, tokenizer and limits; the first one answers for all.
    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def model_config(self):
        return self.replicas[0].model_config

    @property
    def max_sequence_length(self) -> int:
        return self.replicas[0].max_sequence_length

    @property
    def metrics(self):
        return self.replicas[0].metrics

    @property
    def allocator(self):
        return self.replicas[0].allocator

    @property
    def requests(self) -> collections.ChainMap:
        """Unfinished requests of all replicas (read-only view: id -> RequestState)."""
        return collections.ChainMap(*(core.requests for core in self.replicas))

    @property
    def scheduler(self) -> "SchedulerTotals":
        return SchedulerTotals(sum(c.scheduler.num_running for c in self.replicas),
                                sum(c.scheduler.num_waiting for c in self.replicas))

    def loads(self) -> list[ReplicaLoad]:
        return [replica_load(core) for core in self.replicas]

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Validates, then queues the request on the replica ``pick_replica`` chooses."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        index = pick_replica(self.loads())
        state = self.replicas[index].add_request(prompt, params, request_id)
        self._owner[request_id] = index
        return state

    def prepare_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Tokenizes and validates (any thread); ``enqueue_request`` then places it on a replica."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return self.replicas[0].prepare_request(prompt, params, request_id)

    def enqueue_request(self, state) -> None:
        index = pick_replica(self.loads())
        self.replicas[index].enqueue_request(state)
        self._owner[state.request_id] = index

    def abort(self, request_id: str) -> bool:
        index = self._owner.pop(request_id, None)
        return index is not None and self.replicas[index].abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(core.has_unfinished_requests() for core in self.replicas)

    def step(self) -> list[RequestOutput]:
        """One step of every replica with work, run concurrently; their outputs together."""
        busy = [core for core in self.replicas if core.has_unfinished_requests()]
        outputs: list[RequestOutput] = []
        for result in self._pool.map(EngineCore.step, busy):
            outputs.extend(result)
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclasses.dataclass(frozen=True)
class SchedulerTotals:
    """Running / waiting sequences summed over the replicas (what the batching window reads)."""

    num_running: int
    num_waiting: int
