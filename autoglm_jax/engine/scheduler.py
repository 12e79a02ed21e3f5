"""Continuous-batching scheduler: which sequences run in the next step, with which tokens and pages.

Owns: the waiting queue (FCFS), the running set, batch-slot assignment, per-step token budgeting,
KV-page reservation through ``PageAllocator`` and preemption by recompute. It does not touch device
arrays, sample tokens, detect stop tokens (the engine calls ``finish(id, FinishReason.STOP)``) or
detokenize. Pure host Python: no JAX.

One step (``schedule`` then ``update``, strictly alternating):
  1. Running decodes, oldest first, 1 token each.
  2. Prefill chunks of running requests whose known tokens are not all computed, oldest first.
  3. Waiting requests in FCFS order, each while a slot, the prefill budget and free pages allow;
     skipped in a step that preempted. Static batching mode admits only members of the current batch
     (see ``_admission_open``).
  Prefill (2 + 3) gets ``config.prefill_token_cap`` tokens when the step has decodes, the whole
  ``max_num_batched_tokens`` otherwise.
  When a running request needs a page and none is free, the newest running request is preempted
  (its pages and slot freed, ``num_computed_tokens`` reset, put at the front of the waiting queue);
  if that is the requester itself it simply waits. A request whose tokens need more pages than the
  whole pool is finished with ``FinishReason.ERROR`` (reported in ``SchedulerOutput.finished``).

Async scheduling (``schedule_ahead``): while a step is pending, the next one is planned before its tokens
are known (as vLLM's async scheduling does), by ``schedule``'s own code on the state ``update`` would leave
if every sequence sampled all the tokens it may: each running request advanced past its pending entry,
with one ``PENDING_TOKEN`` placeholder per token it samples (a decode feeds ``PENDING_TOKEN``: the runner
takes the token from the device), and those that reach their length limit with the pending step released
at once (they are finished by ``update``). The plan may hold decodes, prefill chunks of known tokens and
admissions, so mixed steps are planned ahead as well as decode calls. It becomes the pending step when
``update`` consumes the current one; entries of requests that finish or are aborted meanwhile are then
skipped. It is the plan ``schedule`` would make after the update, up to sequences that stop early (a
stop token or string): a plan that would preempt, fail a request as never fitting or form a new static
batch is not made (None; nothing changes but that early release) and ``schedule`` decides after the update.

Length rules (``max_sequence_length`` = M): prompts must have 1 .. M - 1 tokens (``add_request``
raises ``ValueError`` otherwise); generation stops with ``FinishReason.LENGTH`` when the sequence
reaches ``min(prompt + max_tokens, M)`` tokens.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import itertools
import time
from collections.abc import Callable, Mapping, Sequence

from autoglm_jax.engine.page_allocator import PageAllocator
from autoglm_jax.engine.request import FinishReason, Request, RequestStatus
from autoglm_jax.engine.scheduler_config import SchedulerConfig
from autoglm_jax.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from autoglm_jax.engine.step_plan import StepPlan

__all__ = ["PENDING_TOKEN", "Scheduler", "SchedulerConfig", "SchedulerOutput", "ScheduledSequence"]

PENDING_TOKEN = -1  # token id of an entry planned ahead: the pending step samples it (it stays on the device)


class _CannotPlanAhead(Exception):
    """``schedule_ahead`` met a decision only ``schedule`` may take after the update (see there)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, clock: Callable[[], float] = time.monotonic):
        if allocator.page_size != config.page_size:
            raise ValueError(f"allocator.page_size={allocator.page_size} != config.page_size={config.page_size}")
        self.config = config
        self.allocator = allocator
        self._clock = clock
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._token_limits: dict[str, int] = {}  # request id -> _max_total_tokens (asked several times a step)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []  # admission order: oldest first, newest last
        self._free_slots = list(range(config.max_batch_size))  # min-heap: lowest free row first
        self._pending: SchedulerOutput | None = None  # last non-empty output awaiting update()
        self._pending_requests: dict[str, Request] = {}  # the requests _pending was planned for
        self._ahead: tuple[SchedulerOutput, dict[str, Request]] | None = None  # schedule_ahead()'s plan
        self._released_ahead: set[str] = set()  # requests released by schedule_ahead, finished by update()
        self._undo: list[Callable[[], None]] | None = None  # while schedule_ahead plans: how to take it back
        self._batch_waiting: set[str] = set()  # static batching: members of the current batch not yet admitted
        self.num_preemptions = 0  # total over the scheduler's life

    # ----------------------------------------------------------------- public queries

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    def admission_blocked(self) -> bool:
        """Whether the next step would leave the first waiting request waiting even if no running request
        finished: the queue is empty, admission is closed (static batching: every member of the running
        batch is admitted), no batch slot is free, or its first chunk's pages do not fit the free pool.
        The engine then runs multi-step decode calls: nothing could join the batch anyway."""
        return not self._would_admit(num_decodes=len(self._running))

    def next_lookahead(self, max_lookahead_tokens: int) -> int:
        """Extra decode steps for the next call: ``max_lookahead_tokens`` when every running request decodes
        and ``admission_blocked()`` (nothing could join the batch anyway), else 0 (a step with prefill work
        runs the mixed program, which samples once)."""
        if max_lookahead_tokens and all(map(self._is_decoding, self._running)) and self.admission_blocked():
            return max_lookahead_tokens
        return 0

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    # ----------------------------------------------------------------- request life cycle

    def add_request(self, request: Request) -> None:
        """Queue a fresh request (status WAITING, nothing computed); ValueError if it is invalid."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already queued or running")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.pages:
            raise ValueError(f"request {request.request_id!r} is not fresh (status={request.status.name})")
        num_prompt, limit = request.num_prompt_tokens, self.config.max_sequence_length
        if num_prompt == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if num_prompt >= limit:
            raise ValueError(
                f"request {request.request_id!r}: prompt has {num_prompt} tokens but "
                f"max_sequence_length={limit} allows at most {limit - 1} (one token must be generated)"
            )
        max_tokens = getattr(request.sampling_params, "max_tokens", None)
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"request {request.request_id!r}: max_tokens={max_tokens!r} must be None or an int >= 1")
        self._requests[request.request_id] = request
        self._token_limits[request.request_id] = limit if max_tokens is None else min(num_prompt + max_tokens, limit)
        self._waiting.append(request)

    def finish(self, request_id: str, reason: FinishReason) -> Request:
        """End an unfinished request: free its pages and slot, set its status. KeyError if unknown."""
        request = self._requests.pop(request_id, None)
        if request is None:
            raise KeyError(f"request {request_id!r} is not queued or running (unknown or already finished)")
        del self._token_limits[request_id]
        if request.status is RequestStatus.RUNNING:
            if request_id in self._released_ahead:
                self._released_ahead.remove(request_id)  # its pages and slot went with schedule_ahead
            else:
                self._release(request)
        else:
            self._waiting.remove(request)
            self._batch_waiting.discard(request_id)
        request.status = reason.status
        request.finish_reason = reason
        request.finished_time = self._clock()
        return request

    def abort(self, request_id: str) -> bool:
        """Finish with ABORT if the request is unfinished; returns whether it was."""
        if request_id not in self._requests:
            return False
        self.finish(request_id, FinishReason.ABORT)
        return True

    # ----------------------------------------------------------------- one step

    def schedule(self, num_lookahead_tokens: int = 0) -> SchedulerOutput:
        """Choose the next step's sequences. ``num_lookahead_tokens``: extra decode steps the runner
        will take in the same call; pages for them are allocated now (clamped per sequence to what it
        may still generate)."""
        if self._pending is not None:
            raise RuntimeError("schedule() called before update() consumed the previous step's output")
        if num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens={num_lookahead_tokens} must be >= 0")
        self._check_released_ahead()
        output = self._plan(num_lookahead_tokens)
        self._set_pending(None if output.is_empty else output)
        return output

    def _plan(self, num_lookahead_tokens: int) -> SchedulerOutput:
        """``schedule``'s decisions (module docstring), on the requests as they are now."""
        if not (self.config.use_dynamic_batching or self._running or self._batch_waiting):
            if self._undo is not None:
                raise _CannotPlanAhead  # the next static batch forms after the update
            # static batching, the last batch done: the requests waiting now form the next one
            self._batch_waiting = {r.request_id for r in itertools.islice(self._waiting, self.config.max_batch_size)}
        admission_open = self._admission_open()
        plan = StepPlan(self.config, num_lookahead_tokens)
        decoding, prefilling = [], []
        for request in self._running:  # whether a request decodes does not change while others are scheduled
            (decoding if self._is_decoding(request) else prefilling).append(request)
        for request in decoding:
            self._schedule_running(request, plan, is_decoding=True)
        for request in prefilling:
            self._schedule_running(request, plan, is_decoding=False)
        if admission_open and not plan.preempted:
            self._admit_waiting(plan)
        return plan.build()

    def schedule_ahead(self, max_lookahead_tokens: int, num_sampled: Mapping[str, int]) -> SchedulerOutput | None:
        """Async scheduling: plan the step after the pending one before its tokens are known.

        ``num_sampled[request_id]``: tokens the pending step samples for that sequence unless it stops
        (1 + its lookahead in a decode call, 1 in a mixed step); every sequence the pending step samples
        for must be listed. ``max_lookahead_tokens``: the lookahead of a decode call (``next_lookahead``
        decides, on the state after the pending step). Returns the plan, or None when only ``schedule``
        after the update may decide (module docstring; the plan is then not made and nothing changes
        but the release of the requests that reach their length limit with the pending step). A sequence
        that samples fewer tokens than ``num_sampled`` says must be finished (``finish``) after ``update``.
        The plan becomes the pending step when ``update`` consumes the current one."""
        if self._pending is None or self._ahead is not None:
            raise RuntimeError("schedule_ahead() needs a pending step and no plan ahead of it")
        if max_lookahead_tokens < 0:
            raise ValueError(f"max_lookahead_tokens={max_lookahead_tokens} must be >= 0")
        self._check_released_ahead()
        pending = {e.request_id: e for e in self._pending.scheduled
                   if self._requests.get(e.request_id) is self._pending_requests[e.request_id]}
        if any(e.sample and num_sampled.get(i, 0) < 1 for i, e in pending.items()):
            return None  # a sequence that samples nothing: no state after the step to plan from
        self._release_finishing(pending, num_sampled)
        self._undo = []
        try:
            with self._after_pending(pending, num_sampled):
                output = self._plan(self.next_lookahead(max_lookahead_tokens))
        except _CannotPlanAhead:
            for undo in reversed(self._undo):
                undo()
            return None
        finally:
            self._undo = None
        if output.is_empty:
            return None
        self._ahead = (output, {e.request_id: self._requests[e.request_id] for e in output.scheduled})
        return output

    def _release_finishing(self, pending: dict[str, ScheduledSequence], num_sampled: Mapping[str, int]) -> None:
        """Releases the pages and slots of the running requests that reach their length limit with the
        pending step (``update`` finishes them): the step after it may give them to others, as ``schedule``
        after the update would. Those pages are not read again after the pending step, which the device
        runs before any step planned later."""
        for request_id in pending:
            request = self._requests[request_id]
            count = num_sampled.get(request_id, 0)
            limit = self._max_total_tokens(request)
            if count and request.status is RequestStatus.RUNNING and request.num_tokens + count >= limit:
                self._release(request)
                self._released_ahead.add(request_id)

    @contextlib.contextmanager
    def _after_pending(self, pending: dict[str, ScheduledSequence], num_sampled: Mapping[str, int]):
        """The running requests as ``update`` leaves them if each samples all its ``num_sampled`` tokens:
        cached tokens past their pending entry, and one ``PENDING_TOKEN`` per sampled token (restored on exit)."""
        advanced = []
        for request in self._running:
            entry = pending.get(request.request_id)
            if entry is None:
                continue  # not in the pending step (no prefill budget was left for it)
            count = num_sampled.get(request.request_id, 0)
            advanced.append((request, request.num_computed_tokens, len(request.output_token_ids)))
            request.num_computed_tokens = entry.end_position + max(0, count - 1)
            request.output_token_ids.extend([PENDING_TOKEN] * count)
        try:
            yield
        finally:
            for request, num_computed, num_outputs in advanced:
                request.num_computed_tokens = num_computed
                del request.output_token_ids[num_outputs:]

    def _check_released_ahead(self) -> None:
        if self._released_ahead:
            raise RuntimeError(
                f"requests {sorted(self._released_ahead)} were planned to reach their length limit in the last step "
                "but were neither finished by update() nor with finish(): a sequence that samples fewer tokens "
                "than schedule_ahead() was told must be finished")

    def _would_admit(self, num_decodes: int) -> bool:
        """Whether the next ``schedule`` would act on the first waiting request (``num_decodes`` decode
        tokens in the step): admit it, or fail it as never fitting. Its prefill budget is ``StepPlan``'s."""
        if not (self._waiting and self._free_slots and self._admission_open()):
            return False
        request = self._waiting[0]
        limit = self.config.max_num_batched_tokens
        budget = min(limit - num_decodes, self.config.prefill_tokens_with_decodes(num_decodes)) if num_decodes else limit
        num_new = self._prefill_chunk(request, budget)
        if num_new == 0:
            return False
        pages = self.allocator.pages_needed(request.num_computed_tokens + num_new)  # no lookahead while waiting
        return pages > self.allocator.num_usable_pages or self.allocator.can_allocate(pages)

    def _set_pending(self, output: SchedulerOutput | None, requests: dict[str, Request] | None = None) -> None:
        self._pending = output
        if requests is None and output is not None:
            requests = {e.request_id: self._requests[e.request_id] for e in output.scheduled}
        self._pending_requests = requests or {}

    def update(self, sampled: Mapping[str, Sequence[int]]) -> tuple[str, ...]:
        """Apply the runner's results for the last scheduled step.

        ``sampled[request_id]``: the tokens sampled for a sequence scheduled with ``sample=True``
        (1 + at most ``num_lookahead_tokens``; tokens past the row's own allowance or its length
        limit are dropped). To honour a stop token the engine passes tokens up to and including it,
        then calls ``finish(id, FinishReason.STOP)``. Sequences aborted since ``schedule`` are skipped.
        Invalid input raises ``ValueError`` before anything changes (the step stays pending).
        Returns the ids this call finished with ``FinishReason.LENGTH``. A plan made by
        ``schedule_ahead`` then becomes the pending step.
        """
        output = self._pending
        entries = {} if output is None else {e.request_id: e for e in output.scheduled}
        unknown = sampled.keys() - entries.keys()
        if unknown:
            raise ValueError(f"sampled tokens for request(s) not scheduled in the last step: {sorted(unknown)}")
        live = [(e, request) for e in entries.values()
                if self._requests.get(e.request_id) is (request := self._pending_requests[e.request_id])]
        most = 1 + output.num_lookahead_tokens if output is not None else 1
        for entry, _ in live:  # validate everything before changing anything
            tokens = sampled.get(entry.request_id, ())
            if (not tokens) == entry.sample or len(tokens) > most:
                self._check_sampled(entry, tokens, output.num_lookahead_tokens)  # raises, naming the problem
        self._set_pending(*(self._ahead or (None,)))
        self._ahead = None
        now = self._clock()
        finished = []
        for entry, request in live:  # requests finished or aborted since schedule() are not in `live`
            if self._apply_step(request, entry, list(sampled.get(entry.request_id, ())), now):
                finished.append(entry.request_id)
        return tuple(finished)

    # ----------------------------------------------------------------- running requests

    @staticmethod
    def _is_decoding(request: Request) -> bool:
        """One sampled token awaits feeding (as opposed to prompt or re-prefill tokens)."""
        return request.num_uncomputed_tokens == 1 and request.num_output_tokens > 0

    def _schedule_running(self, request: Request, plan: StepPlan, is_decoding: bool) -> None:
        if request.status is not RequestStatus.RUNNING:  # preempted earlier in this step
            return
        if is_decoding:
            num_new = 1 if plan.decode_tokens_left() > 0 else 0
        else:
            num_new = self._prefill_chunk(request, plan.prefill_tokens_left())
        if num_new == 0:
            return
        num_lookahead = self._lookahead_for(request, num_new, plan.num_lookahead_tokens)
        if self._reserve_pages(request, request.num_computed_tokens + num_new + num_lookahead, plan):
            plan.add(self._entry(request, num_new, num_lookahead, is_new=False, is_decode=is_decoding))

    def _prefill_chunk(self, request: Request, budget: int) -> int:
        """Prompt/re-prefill tokens to feed this step within ``budget`` (0 = none fits)."""
        remaining = request.num_uncomputed_tokens
        if not self.config.enable_chunked_prefill:
            return remaining if remaining <= budget else 0
        chunk_cap = self.config.max_prefill_chunk_tokens or remaining
        return min(remaining, budget, chunk_cap)

    def _lookahead_for(self, request: Request, num_new: int, requested: int) -> int:
        """Extra positions to reserve after this step's tokens: only when the step samples, and never
        past the last position the request may feed (its length limit - 2) or the pool's capacity."""
        end = request.num_computed_tokens + num_new
        if end < request.num_tokens:
            return 0
        return self._lookahead_at(request, end, requested)

    def _lookahead_at(self, request: Request, end: int, requested: int) -> int:
        """Lookahead of a sampling step whose fed tokens end at ``end`` (cache length after them)."""
        if requested == 0:
            return 0
        pool_tokens = self.allocator.num_usable_pages * self.config.page_size
        last_fed_count = min(self._max_total_tokens(request) - 1, pool_tokens)
        return max(0, min(requested, last_fed_count - end))

    def _max_total_tokens(self, request: Request) -> int:
        """min(prompt + max_tokens, max_sequence_length) of an unfinished request (computed when queued)."""
        return self._token_limits[request.request_id]

    # ----------------------------------------------------------------- pages and preemption

    def _reserve_pages(self, request: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Grow a running request's pages to hold ``num_tokens``, preempting newest-first if short.
        False if the request itself was preempted or finished with ERROR."""
        if self.allocator.pages_needed(num_tokens) <= len(request.pages):  # most decode steps: nothing to add
            return True
        if self._never_fits(request, num_tokens, plan):
            return False
        while not self._grow_pages(request, num_tokens):
            if self._undo is not None:
                raise _CannotPlanAhead  # a preemption: decided after the update
            victim = self._running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return False
        return True

    def _grow_pages(self, request: Request, num_tokens: int) -> bool:
        missing = self.allocator.pages_needed(num_tokens) - len(request.pages)
        if missing <= 0:
            return True
        if not self.allocator.can_allocate(missing):
            return False
        if self._undo is not None:
            self._undo.append(functools.partial(self._take_back_pages, request, len(request.pages)))
        request.pages.extend(self.allocator.allocate(missing))
        return True

    def _take_back_pages(self, request: Request, num_kept: int) -> None:
        """Undo of page allocations (a declined plan ahead): the pages past ``num_kept`` go back as they were."""
        self.allocator.unallocate(request.pages[num_kept:])
        del request.pages[num_kept:]

    def _never_fits(self, request: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Finish with ERROR a request that needs more pages than the pool has."""
        needed = self.allocator.pages_needed(num_tokens)
        if needed <= self.allocator.num_usable_pages:
            return False
        if self._undo is not None:
            raise _CannotPlanAhead  # finished with ERROR after the update
        plan.withdraw(request.request_id)
        self.finish(request.request_id, FinishReason.ERROR)
        request.error_message = (
            f"request {request.request_id!r} needs {needed} KV pages for {num_tokens} tokens but the pool "
            f"has only {self.allocator.num_usable_pages} (page_size={self.config.page_size})"
        )
        plan.finished.append(request.request_id)
        return True

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        plan.withdraw(request.request_id)
        self._release(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(request)
        if not self.config.use_dynamic_batching:
            self._batch_waiting.add(request.request_id)  # still a member: re-admitted in this batch
        plan.preempted.append(request.request_id)

    def _release(self, request: Request) -> None:
        """Give back a running request's pages and slot and drop it from the running list."""
        self._running.remove(request)
        self.allocator.free(request.pages)
        request.pages = []
        heapq.heappush(self._free_slots, request.slot)
        request.slot = None

    # ----------------------------------------------------------------- admission

    def _admission_open(self) -> bool:
        """Dynamic batching: always. Static batching: while members of the current batch wait to be
        admitted, or when no batch is left (nothing running, no member waiting) and the next ``schedule``
        forms one. A batch is the first min(max_batch_size, waiting) requests of the queue when it forms
        (all slots are free then); its members are admitted in FCFS order over as many steps as the
        token budget and pages need (admitted ones may decode meanwhile), a preempted member goes back
        to waiting as a member, and a member finished while waiting leaves it. Requests arriving later
        wait for the next batch, which forms once every member has finished. Waiting members are always
        the head of the queue, so while one waits the first waiting request is a member."""
        return self.config.use_dynamic_batching or bool(self._batch_waiting) or not self._running

    def _admit_waiting(self, plan: StepPlan) -> None:
        """Admit waiting requests in FCFS order; stop at the first that does not fit."""
        static = not self.config.use_dynamic_batching
        while self._waiting and self._free_slots:
            request = self._waiting[0]
            if static and request.request_id not in self._batch_waiting:
                return  # not a member of the current batch: it waits for the next one
            num_new = self._prefill_chunk(request, plan.prefill_tokens_left())
            if num_new == 0:
                return
            num_lookahead = self._lookahead_for(request, num_new, plan.num_lookahead_tokens)
            num_tokens = request.num_computed_tokens + num_new + num_lookahead
            if self._never_fits(request, num_tokens, plan):
                continue
            if not self.allocator.can_allocate(self.allocator.pages_needed(num_tokens)):
                return
            self._admit(self._waiting.popleft(), num_tokens)
            plan.add(self._entry(request, num_new, num_lookahead, is_new=True, is_decode=self._is_decoding(request)))

    def _admit(self, request: Request, num_tokens: int) -> None:
        if self._undo is not None:
            self._undo.append(functools.partial(
                self._take_back_admission, request, request.status, request.first_scheduled_time,
                request.request_id in self._batch_waiting))
        self._batch_waiting.discard(request.request_id)
        request.status = RequestStatus.RUNNING
        request.slot = heapq.heappop(self._free_slots)
        request.pages = self.allocator.allocate(self.allocator.pages_needed(num_tokens))
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self._clock()
        self._running.append(request)

    def _take_back_admission(self, request: Request, status: RequestStatus, first_scheduled_time: float | None,
                             batch_member: bool) -> None:
        """Undo of ``_admit`` (a declined plan ahead): the request waits first in the queue as before."""
        assert self._running[-1] is request, "admissions are taken back newest first"
        self._running.pop()
        self.allocator.unallocate(request.pages)
        request.pages = []
        heapq.heappush(self._free_slots, request.slot)
        request.slot = None
        request.status, request.first_scheduled_time = status, first_scheduled_time
        self._waiting.appendleft(request)
        if batch_member:
            self._batch_waiting.add(request.request_id)

    @staticmethod
    def _entry(request: Request, num_new: int, num_lookahead: int, is_new: bool, is_decode: bool) -> ScheduledSequence:
        start = request.num_computed_tokens
        return ScheduledSequence(
            request_id=request.request_id, slot=request.slot, token_ids=request.token_ids_between(start, start + num_new),
            start_position=start, page_ids=tuple(request.pages), sample=start + num_new == request.num_tokens,
            is_new=is_new, is_decode=is_decode, num_lookahead_tokens=num_lookahead)

    # ----------------------------------------------------------------- results

    @staticmethod
    def _check_sampled(entry: ScheduledSequence, tokens: Sequence[int], num_lookahead_tokens: int) -> None:
        if entry.sample and not tokens:
            raise ValueError(f"request {entry.request_id!r} was scheduled to sample but got no token")
        if not entry.sample and tokens:
            raise ValueError(f"request {entry.request_id!r} was mid-prefill (sample=False) but got tokens {list(tokens)}")
        if len(tokens) > 1 + num_lookahead_tokens:
            raise ValueError(
                f"request {entry.request_id!r} got {len(tokens)} tokens; at most 1 + "
                f"num_lookahead_tokens={num_lookahead_tokens} can be sampled in one step"
            )

    def _apply_step(self, request: Request, entry: ScheduledSequence, tokens: list[int], now: float) -> bool:
        """Advance the request past the step; True if it hit its length limit (and was finished)."""
        limit = self._max_total_tokens(request)
        kept = tokens[: min(1 + entry.num_lookahead_tokens, limit - request.num_tokens)]
        request.num_computed_tokens = entry.start_position + len(entry.token_ids) + max(0, len(kept) - 1)
        if kept:
            request.output_token_ids.extend(map(int, kept))
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
        if request.num_tokens >= limit:
            self.finish(request.request_id, FinishReason.LENGTH)
            return True
        return False
