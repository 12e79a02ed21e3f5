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

Async scheduling (``schedule_ahead``): while a step is pending, the next one may be planned before its
tokens are known, assuming every sequence samples all the tokens it may (a sequence that samples fewer
finishes with the pending step). That plan feeds ``PENDING_TOKEN`` (the runner takes the token from the
device) and becomes the pending step when ``update`` consumes the current one; entries of requests
that finish or are aborted meanwhile are then skipped. It is only made when it is the plan ``schedule``
would make after the update, up to sequences that stop early: all running requests sample in the
pending step, the first waiting request could not be admitted, and the pages fit without preemption.

Length rules (``max_sequence_length`` = M): prompts must have 1 .. M - 1 tokens (``add_request``
raises ``ValueError`` otherwise); generation stops with ``FinishReason.LENGTH`` when the sequence
reaches ``min(prompt + max_tokens, M)`` tokens.
"""

from __future__ import annotations

import collections
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
        return not self._would_admit([], [], num_decodes=len(self._running))

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
        if not (self.config.use_dynamic_batching or self._running or self._batch_waiting):
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
        output = plan.build()
        self._set_pending(None if output.is_empty else output)
        return output

    def schedule_ahead(self, num_lookahead_tokens: int, num_sampled: Mapping[str, int]) -> SchedulerOutput | None:
        """Async scheduling: plan the step after the pending one before its tokens are known.

        ``num_sampled[request_id]``: tokens the pending step samples for that sequence unless it stops
        (1 + its lookahead in a decode call, 1 in a mixed step). Each running request is assumed to get
        all of them; one that reaches its length limit so is left out. Entries feed ``PENDING_TOKEN``.
        Returns None, changing nothing, when the plan could differ from what ``schedule`` would do after
        ``update`` unless sequences stop early: a running request samples nothing in the pending step,
        the first waiting request would be admitted (counting what sequences reaching their length limit
        release), or the pages do not fit without preemption. (One that only a stop token or string frees
        room for is admitted a step later than one step at a time would.) The plan becomes the pending
        step when ``update`` consumes the current one."""
        if self._pending is None or self._ahead is not None:
            raise RuntimeError("schedule_ahead() needs a pending step and no plan ahead of it")
        growth = self._growth_ahead(num_lookahead_tokens, num_sampled)
        if growth is None:
            return None
        entries = []
        for request, num_tokens, lookahead, missing in growth:
            if missing:
                request.pages.extend(self.allocator.allocate(missing))
            entries.append(ScheduledSequence(
                request_id=request.request_id, slot=request.slot, token_ids=(PENDING_TOKEN,),
                start_position=num_tokens - 1, page_ids=tuple(request.pages), sample=True, is_new=False,
                is_decode=True, num_lookahead_tokens=lookahead))
        output = SchedulerOutput(scheduled=tuple(entries), num_lookahead_tokens=num_lookahead_tokens)
        self._ahead = (output, {request.request_id: request for request, *_ in growth})
        return output

    def _growth_ahead(self, num_lookahead_tokens: int, num_sampled: Mapping[str, int]):
        """[(request, its tokens after the pending step, lookahead, pages to add)] of the requests that
        go on decoding, or None when ``schedule_ahead`` must not plan (see there)."""
        if self._running and num_sampled.get(self._running[-1].request_id, 0) < 1:
            return None  # the newest request is mid-prefill (the usual reason to stop): no need to look at all
        growth, finishing = [], []
        usable_pages, pages_needed = self.allocator.num_usable_pages, self.allocator.pages_needed
        for request in self._running:
            count = num_sampled.get(request.request_id, 0)
            if count < 1:
                return None
            num_tokens = request.num_tokens + count
            if num_tokens >= self._max_total_tokens(request):
                finishing.append(request)  # reaches its length limit with the pending step
                continue
            lookahead = self._lookahead_at(request, num_tokens, num_lookahead_tokens) if num_lookahead_tokens else 0
            pages = pages_needed(num_tokens + lookahead)
            if pages > usable_pages:
                return None
            growth.append((request, num_tokens, lookahead, max(0, pages - len(request.pages))))
        missing = sum(g[3] for g in growth)
        if not growth or not self.allocator.can_allocate(missing) or self._would_admit(growth, finishing, num_decodes=len(growth)):
            return None
        return growth

    def _would_admit(self, growth: list, finishing: list[Request], num_decodes: int) -> bool:
        """Whether ``schedule`` would act on the first waiting request in the step after the pending
        one (``growth`` decoding, the ``finishing`` requests' slots and pages released, ``num_decodes``
        decode tokens in it): admit it, or fail it as never fitting. Its prefill budget is ``StepPlan``'s."""
        free_slots = len(self._free_slots) + len(finishing)
        if not (self._waiting and free_slots and self._admission_open()):
            return False
        request = self._waiting[0]
        limit = self.config.max_num_batched_tokens
        budget = min(limit - num_decodes, self.config.prefill_tokens_with_decodes(num_decodes)) if num_decodes else limit
        num_new = self._prefill_chunk(request, budget)
        if num_new == 0:
            return False
        pages = self.allocator.pages_needed(request.num_computed_tokens + num_new)  # no lookahead while waiting
        released = sum(self.allocator.refcount(page) == 1 for r in finishing for page in r.pages)
        free_pages = self.allocator.num_free + released - sum(g[3] for g in growth)
        return pages > self.allocator.num_usable_pages or pages <= free_pages

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
        request.pages.extend(self.allocator.allocate(missing))
        return True

    def _never_fits(self, request: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Finish with ERROR a request that needs more pages than the pool has."""
        needed = self.allocator.pages_needed(num_tokens)
        if needed <= self.allocator.num_usable_pages:
            return False
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
        self._batch_waiting.discard(request.request_id)
        request.status = RequestStatus.RUNNING
        request.slot = heapq.heappop(self._free_slots)
        request.pages = self.allocator.allocate(self.allocator.pages_needed(num_tokens))
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self._clock()
        self._running.append(request)

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
