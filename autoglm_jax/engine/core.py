"""The synchronous engine core: requests in, one ``step()`` at a time, RequestOutputs out.

Owns: wiring model, tokenizer, scheduler, runner and output state together; request validation;
n > 1 fan-out and seeds. ``LLM`` drives it in a loop; ``AutoGLMEngine`` drives it from a thread.
On one device the start-up compiles the step programs from the weights' abstract values while the
weights load (``serving_model_shapes``), so it takes about the longer of the two, not their sum.
It is not thread-safe: one caller at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import logging
import numbers
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.checkpoint.loader import load_model, model_config_of, resolve_model_source
from autoglm_jax.engine.autotune_seed import seed_for_engine
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.executable_cache import resolve_executable_cache
from autoglm_jax.model.attention import resolve_attention_backend
from autoglm_jax.model.kv_cache import resolve_kv_cache_dtype
from autoglm_jax.engine.metrics import EngineMetrics
from autoglm_jax.engine.memory import PoolPlan, enable_compilation_cache, fit_programs, plan_pool
from autoglm_jax.engine.output_state import RequestState, SequenceState
from autoglm_jax.engine.page_allocator import PageAllocator
from autoglm_jax.engine.request import FinishReason, Request
from autoglm_jax.engine.runner import STOP_IDS_WIDTH, ModelRunner, RowRequest
from autoglm_jax.engine.scheduler import Scheduler
from autoglm_jax.engine.step_log import DEFAULT_CAPACITY, StepLog
from autoglm_jax.outputs import RequestOutput
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tokenizer_loading import load_tokenizer

log = logging.getLogger(__name__)
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def resolve_scan_layers(setting: bool | None) -> bool:
    """The engine arg ``scan_layers``: None = unrolled layers on GPU (weight-bound steps), scan elsewhere."""
    return jax.default_backend() != "gpu" if setting is None else setting


def resolve_async_scheduling(setting: bool | None) -> bool:
    """The engine arg ``async_scheduling``: None = on, on every backend. Its outputs equal one step at a
    time (tests/engine/test_async_scheduling.py), so CPU runs, CI included, take the GPU's code path."""
    return True if setting is None else setting


GPU_GIL_SWITCH_INTERVAL_MS = 0.5


def resolve_gil_switch_interval(setting_ms: float | None) -> float | None:
    """The engine arg ``gil_switch_interval_ms`` as seconds for ``sys.setswitchinterval``, or None to leave
    Python's. None = ``GPU_GIL_SWITCH_INTERVAL_MS`` on GPU (the launch thread starts step programs while the
    engine thread works), Python's own elsewhere (on CPU the "device" shares the host's cores)."""
    if setting_ms is None:
        return GPU_GIL_SWITCH_INTERVAL_MS / 1000 if jax.default_backend() == "gpu" else None
    return setting_ms / 1000


GC_THRESHOLD0 = 50_000  # first-generation threshold of Python's GC with python_gc="tuned" (Python's: 700)


def resolve_python_gc(mode: str) -> bool:
    """The engine arg ``python_gc``: True = tune the collector (``tune_python_gc``). "auto" = on GPU only."""
    return mode == "tuned" or (mode == "auto" and jax.default_backend() == "gpu")


def tune_python_gc() -> None:
    """Collects and freezes the heap alive now (never scanned again) and raises the first generation's
    threshold to GC_THRESHOLD0 (process-wide; ``EngineConfig.python_gc``)."""
    gc.collect()
    gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, threshold1, threshold2)


def serving_model_shapes(cfg: EngineConfig, model_config, dtype, attention_backend: str, scan_layers: bool):
    """The model ``load_model`` gives and the runner serves (quantized, matmul backend applied, unstacked
    when not ``scan_layers``) as abstract values only (``nnx.eval_shape``): shapes, dtypes and graph for
    compiling the step programs before the weights exist. One device only."""
    from flax import nnx

    from autoglm_jax.checkpoint.loader import build_model, transform_model

    def build():
        model = transform_model(build_model(model_config, None, dtype, attention_backend, cfg.seed),
                                cfg.quantization, cfg.matmul_backend)
        if not scan_layers:
            model.layers.unstack()
        return model

    return nnx.eval_shape(build)


def param_bytes(model) -> int:
    """Bytes of a model's parameters, from their shapes and dtypes (the model may be abstract)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(model))


@dataclasses.dataclass(frozen=True)
class _StepInFlight:
    """A step handed to the runner: its plan, and the requests and sequences it was planned for (a
    request finished or aborted meanwhile keeps its objects here, finished, and its tokens are dropped)."""

    output: object  # SchedulerOutput
    sequences: dict[str, tuple[RequestState, SequenceState]]
    requests: dict[str, Request]
    handle: object = None   # runner.StepHandle (async scheduling), or
    results: tuple = ()     # runner.execute's (sampled, prompt_logprobs) (one step at a time)


@dataclasses.dataclass(frozen=True)
class RequestBuilder:
    """Tokenizes and validates a prompt and its SamplingParams against one model's vocabulary and an
    engine's limits, and builds the request's RequestState (n sequences, seeded). Needs no device:
    ``EngineCore`` prepares requests with it, and the data-parallel process front
    (``parallel.replica_processes``) validates in the caller while its replica processes build the states."""

    tokenizer: object | None  # None: prompts must be token ids, and stop strings are refused
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_sequence_length: int
    max_logprobs: int

    def prepare(self, prompt, params: SamplingParams | None, request_id: str, seed_rng: random.Random) -> RequestState:
        """prompt: str, list of token ids or {"prompt_token_ids": [...]}. Raises ValueError / TypeError for
        an empty or too long prompt or bad parameters. Without ``params.seed`` the seed comes from seed_rng."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self.prompt_tokens(prompt)
        self.validate(token_ids, params)
        base_seed = params.seed if params.seed is not None else seed_rng.getrandbits(32)
        return self.build(request_id, text, token_ids, params, base_seed)

    def build(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
              base_seed: int) -> RequestState:
        """The RequestState of an already validated request; sequence i samples with seed base_seed + i."""
        state = RequestState(request_id, text, token_ids, params, [], tokenizer=self.tokenizer)
        for index in range(params.n):
            sequence_id = request_id if params.n == 1 else f"{request_id}#{index}"
            seq = SequenceState(sequence_id, index, params, token_ids, self.tokenizer, self.eos_token_ids,
                                self.max_sequence_length)
            seq.seed = base_seed + index
            state.sequences.append(seq)
        return state

    def prompt_tokens(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
            prompt = prompt["prompt_token_ids"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]}")
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise TypeError(f"a prompt must be a str, a list of token ids or {{'prompt_token_ids': [...]}}, "
                            f"got {type(prompt).__name__}")
        not_ints = [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if not_ints:
            raise TypeError(f"prompt token ids must be ints, got {not_ints[:5]}")
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return None, ids

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(token_ids) >= self.max_sequence_length:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; max_sequence_length={self.max_sequence_length} "
                             f"leaves room for at most {self.max_sequence_length - 1}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            wanted = self.vocab_size if value == -1 else value  # -1 = the whole vocabulary
            if wanted is not None and wanted > self.max_logprobs:
                raise ValueError(f"{name}={value} asks for {wanted} logprobs per token; the engine's "
                                 f"max_logprobs={self.max_logprobs}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        num_stop_ids = len(dict.fromkeys([*self.eos_token_ids, *params.stop_token_ids]))
        if num_stop_ids > STOP_IDS_WIDTH:
            raise ValueError(f"{len(params.stop_token_ids)} stop_token_ids (with the model's EOS ids: {num_stop_ids}) "
                             f"exceed the engine's limit of {STOP_IDS_WIDTH} stop ids per request")


class EngineCore:
    def __init__(self, config: EngineConfig | dict | None = None, *, mesh=None, **overrides):
        """``mesh``: the ("tp",) device mesh of this replica (``autoglm_jax.parallel``); None = built
        from ``tensor_parallel_size`` (one device when it is 1)."""
        self.config = cfg = EngineConfig.from_dict(config, **overrides)
        if mesh is None:
            from autoglm_jax.parallel.mesh import engine_mesh

            mesh = engine_mesh(cfg.tensor_parallel_size, cfg.data_parallel_size)
        self.mesh = mesh
        enable_compilation_cache(cfg.compilation_cache_dir)
        interval = resolve_gil_switch_interval(cfg.gil_switch_interval_ms)
        if interval is not None:
            sys.setswitchinterval(interval)  # process-wide (EngineConfig.gil_switch_interval_ms)
        seed_for_engine(cfg.compilation_cache_dir, cfg.xla_autotune_seed)
        start = time.perf_counter()
        self.dtype = resolve_dtype(cfg.dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, self.dtype)
        self.model_config = model_config_of(cfg.model)
        backend = resolve_attention_backend(cfg.attention_backend, self.model_config, self.dtype, cfg.page_size,
                                            self.kv_cache_dtype)
        scan_layers = resolve_scan_layers(cfg.scan_layers)
        load = functools.partial(load_model, cfg.model, self.dtype, backend, cfg.seed, progress=cfg.show_progress,
                                 mesh=mesh, quantization=cfg.quantization, matmul_backend=cfg.matmul_backend)
        # One device: the step programs compile from the weights' abstract values while the weights load
        # (start-up takes the longer of the two, not their sum). A tensor-parallel runner needs the weights
        # first, and an Orbax checkpoint may hold quantized weights (their scheme per weight, e.g. calibrated)
        # that the abstract model cannot know before they are read.
        source = resolve_model_source(cfg.model)
        overlap = mesh is None and source.kind != "orbax"
        if overlap:
            model = serving_model_shapes(cfg, self.model_config, self.dtype, backend, scan_layers)
        else:
            self.model_config, model, source = load()
        self.tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(cfg.tokenizer, source)
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else self.model_config.eos_token_ids
        self.eos_token_ids = eos or self.model_config.eos_token_ids
        self.max_sequence_length = cfg.resolved_max_sequence_length(self.model_config.max_position_embeddings)
        sched_config = cfg.scheduler_config(self.max_sequence_length)
        plan_config, plan_device = self.model_config, None
        if mesh is not None:
            from autoglm_jax.parallel.placement import per_device_plan

            plan_config, plan_device = per_device_plan(self.model_config, mesh)
        pool_plan = plan_pool(
            plan_config, device=plan_device, page_size=cfg.page_size, cache_dtype=self.kv_cache_dtype,
            max_batch_size=cfg.max_batch_size, max_sequence_length=self.max_sequence_length,
            max_num_batched_tokens=sched_config.max_num_batched_tokens, memory_fraction=cfg.memory_fraction,
            pending_bytes=param_bytes(model) if overlap else 0, num_pages=cfg.num_pages)
        self.runner = ModelRunner(
            model, self.model_config, max_batch_size=cfg.max_batch_size,
            max_num_batched_tokens=sched_config.max_num_batched_tokens, max_sequence_length=self.max_sequence_length,
            page_size=cfg.page_size, num_pages=pool_plan.num_pages, cache_dtype=self.kv_cache_dtype,
            decode_steps_per_call=cfg.decode_steps_per_call, max_logprobs=cfg.max_logprobs,
            eos_token_ids=self.eos_token_ids, mesh=mesh, scan_layers=scan_layers,
            executable_cache_dir=resolve_executable_cache(cfg.executable_cache, cfg.compilation_cache_dir),
            xla_gemm_backend=cfg.xla_gemm_backend)
        # seconds to the weights on the device (after a tensor-parallel load: with the runner built)
        if overlap:
            self.weights_seconds = self._load_while_compiling(load, cfg.warmup)
            weights_at = time.perf_counter()
            self._allocate_pool(pool_plan, check_programs=cfg.warmup)
        else:
            self.weights_seconds = time.perf_counter() - start
            weights_at = time.perf_counter()
        del model
        self.allocator = PageAllocator(self.runner.num_pages, cfg.page_size)  # as fitted to the programs
        self.scheduler = Scheduler(sched_config, self.allocator)
        self.requests: dict[str, RequestState] = {}
        self.sequences: dict[str, tuple[RequestState, SequenceState]] = {}
        self._seed_rng = random.Random(cfg.seed)
        self._ids = itertools.count()
        self.metrics = EngineMetrics(time.monotonic())
        self.async_scheduling = resolve_async_scheduling(cfg.async_scheduling)
        self._in_flight: _StepInFlight | None = None  # async scheduling: dispatched, tokens not read yet
        self.step_log: StepLog | None = None  # one row per call when on (enable_step_log)
        self.warmup_seconds = 0.0  # after the weights: the rest of their compile, the pool, warmup's first runs
        if cfg.warmup:
            self.runner.warmup()
            self.warmup_seconds = time.perf_counter() - weights_at
            message = f"warmup compiled {self.runner.num_traces} step variants in {self.warmup_seconds:.1f} s"
            if cfg.show_progress:
                print(f"[autoglm] {message}", file=sys.stderr)
            else:
                log.info(message)
        if resolve_python_gc(cfg.python_gc):
            tune_python_gc()  # process-wide (EngineConfig.python_gc)

    def _load_while_compiling(self, load, compile_first: bool) -> float:
        """Loads the weights (``load()``: config, model, source) into the runner made from their abstract
        values, its step programs compiling in the background meanwhile when ``compile_first``; returns
        the seconds the weights took. The KV pool is not allocated yet (``_allocate_pool``)."""
        start = time.perf_counter()
        if compile_first:
            self.runner.start_compiling()
        try:
            config, model, _ = load()
        except BaseException:
            self.runner.cancel_compiling()
            raise
        if config != self.model_config:
            self.runner.cancel_compiling()
            raise ValueError(f"the loaded model's config differs from the one read before loading: {config} "
                             f"vs {self.model_config}")
        self.runner.bind_weights(model, allocate_pool=False)
        return time.perf_counter() - start

    def _allocate_pool(self, pool_plan: PoolPlan, check_programs: bool) -> None:
        """Allocates the KV pool of ``pool_plan``, when ``check_programs`` first waiting for the background
        compile (warmup would) and checking the compiled programs' memory against the room the plan left
        them (``memory.fit_programs``): a re-planned, smaller pool replaces the planned one, and warmup
        compiles the ladder again for it. Programs dropped by ``bind_weights`` (weights unlike the abstract
        model) are not checked."""
        if check_programs:
            self.runner.finish_compiling()
            fitted = fit_programs(pool_plan, self.runner.program_needs())
            if fitted.num_pages != self.runner.num_pages:
                self.runner.resize_pool(fitted.num_pages)
        self.runner.allocate_pool()

    # ------------------------------------------------------------------ requests
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> RequestState:
        """Validates and queues a request. prompt: str, list of token ids or {"prompt_token_ids": [...]}.
        Raises ValueError (nothing is queued) for an empty or too long prompt or bad parameters."""
        state = self.prepare_request(prompt, params, request_id)
        self.enqueue_request(state)
        return state

    def prepare_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> RequestState:
        """Tokenizes and validates without touching the scheduler (safe from another thread)."""
        request_id = request_id or self.new_request_id()
        if request_id in self.requests or request_id in self.sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return self.request_builder.prepare(prompt, params, request_id, self._seed_rng)

    @property
    def request_builder(self) -> RequestBuilder:
        """Tokenization, validation and RequestState building against this engine's model and limits."""
        return RequestBuilder(self.tokenizer, self.model_config.vocab_size, tuple(self.eos_token_ids),
                              self.max_sequence_length, self.config.max_logprobs)

    def enqueue_request(self, state: RequestState) -> None:
        """Hands a prepared request to the scheduler (engine thread only)."""
        token_ids = state.prompt_token_ids
        for seq in state.sequences:
            self.scheduler.add_request(Request(seq.sequence_id, tuple(token_ids), state.params, time.monotonic()))
            self.sequences[seq.sequence_id] = (state, seq)
        self.requests[state.request_id] = state
        self.metrics.record_arrival()

    def abort(self, request_id: str) -> bool:
        """Aborts a request (all its sequences); its pages are freed at once. False if unknown/finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for seq in state.sequences:
            self.sequences.pop(seq.sequence_id, None)
            request = self.scheduler.get_request(seq.sequence_id)
            if self.scheduler.abort(seq.sequence_id) and request is not None:
                self._record_finished(state, request)
            seq.finish("abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ step log
    def enable_step_log(self, capacity: int = DEFAULT_CAPACITY) -> StepLog:
        """Starts a new, empty step log (``engine.step_log``: one row per call, the last ``capacity``);
        returns it. Call it between steps (from the engine's thread, or while it is idle)."""
        self.disable_step_log()
        self.step_log = StepLog(self.runner, capacity)
        return self.step_log

    def disable_step_log(self) -> StepLog | None:
        """Stops logging; returns the log that was on (its rows stay readable), or None."""
        log, self.step_log = self.step_log, None
        if log is not None:
            log.close()
        return log

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of requests that changed (cumulative).

        With async scheduling the step after this one is dispatched before this one's tokens are read
        back, decode calls and mixed steps alike (``Scheduler.schedule_ahead``): the device runs it while
        the host post-processes this one, and the next call starts by reading it. When only this step's
        tokens can decide the plan (a preemption, a request that never fits), the next step is dispatched
        as soon as they are applied, before this step's outputs are built and returned. Each call still
        returns the outputs of exactly one step, the same as one step at a time; requests that finish here
        drop the tokens the step ahead computed for them, and requests added or aborted between calls take
        effect a step later."""
        log = self.step_log
        if log is None:
            return self._step()
        log.begin(ahead=self._in_flight is not None)
        outputs = self._step()
        log.end()
        return outputs

    def _step(self) -> list[RequestOutput]:
        changed: dict[str, RequestState] = {}
        current, self._in_flight = self._in_flight, None
        if current is None:
            current = self._schedule_and_dispatch(changed)
            if current is None:
                return self._collect(changed)
        if current.handle is not None:
            self._in_flight = self._dispatch_ahead(current)
        self._process(current, changed)
        if current.handle is not None and self._in_flight is None:
            # Not planned ahead (only this step's tokens, now applied, could decide it): planned and
            # dispatched here, before this step's outputs are built and the caller handles them.
            self._in_flight = self._schedule_and_dispatch(changed, record_empty=False)
        return self._collect(changed)

    def _schedule_and_dispatch(self, changed: dict, record_empty: bool = True) -> _StepInFlight | None:
        """Schedules the next step and dispatches it; None when nothing is scheduled (recorded as an empty
        step unless ``record_empty`` is False). Requests that can never fit the KV pool end here."""
        output = self.scheduler.schedule(self._lookahead())
        for sequence_id in output.finished:  # could never fit the KV pool
            self._finish_sequence(sequence_id, "error", changed)
        if not output.scheduled:
            if record_empty:
                self._record_step(output, 0)
            return None
        return self._dispatch(output)

    def _pipelined(self) -> bool:
        """Async scheduling through the runner's dispatch/collect. A wrapped runner (``parallel.multihost``
        mirrors each ``execute`` call to the other processes) runs one step at a time."""
        return self.async_scheduling and isinstance(self.runner, ModelRunner)

    def _dispatch(self, output) -> _StepInFlight:
        """Hands a scheduled step to the runner: dispatched only (async scheduling), or run to the end."""
        sequences, requests, rows = {}, {}, {}
        for scheduled in output.scheduled:
            i = scheduled.request_id
            sequences[i], requests[i] = self.sequences[i], self.scheduler.get_request(i)
            rows[i] = self._row(scheduled, *sequences[i], requests[i])
        step = _StepInFlight(output, sequences, requests)
        if self._pipelined():
            return dataclasses.replace(step, handle=self.runner.dispatch(output, rows))
        return dataclasses.replace(step, results=self.runner.execute(output, rows))

    def _dispatch_ahead(self, current: _StepInFlight) -> _StepInFlight | None:
        """Plans and dispatches the step after ``current`` before its tokens are read (None when the plan
        needs them). Its decodes take their token from the device (``scheduler.PENDING_TOKEN``)."""
        output = self.scheduler.schedule_ahead(self.config.decode_steps_per_call - 1, current.handle.num_sampled)
        return None if output is None else self._dispatch(output)

    def _process(self, current: _StepInFlight, changed: dict) -> None:
        """Reads a step's tokens and applies them: outputs, stops, scheduler update, finished requests."""
        sampled, prompt_logprobs = current.results or self.runner.collect(current.handle)
        live = {i for i, (_, seq) in current.sequences.items() if not seq.finished}  # else finished/aborted since
        for sequence_id, entries in prompt_logprobs.items():
            if sequence_id in live:
                current.sequences[sequence_id][0].add_prompt_logprobs(entries)
        kept, finished = {}, []
        for sequence_id, tokens in sampled.items():
            if sequence_id not in live:
                continue  # tokens computed ahead for a sequence that finished: dropped
            state, seq = current.sequences[sequence_id]
            count = seq.extend(tokens)  # up to and including a token that finishes it
            kept[sequence_id] = tokens.token_ids if count == len(tokens.token_ids) else tokens.token_ids[:count]
            if seq.finished:
                finished.append(sequence_id)
            changed[state.request_id] = state
        self.scheduler.update(kept)
        for sequence_id in finished:
            seq = current.sequences[sequence_id][1]
            if not current.requests[sequence_id].is_finished:
                self.scheduler.finish(sequence_id, _FINISH_REASONS[seq.finish_reason])
            self._finish_sequence(sequence_id, seq.finish_reason, changed)
        for sequence_id in live:
            request, (state, seq) = current.requests[sequence_id], current.sequences[sequence_id]
            if request.is_finished:
                self._record_finished(state, request)
                if not seq.finished:  # finished by the scheduler (length limit)
                    self._finish_sequence(sequence_id, "length", changed)
        num_generated = sum(len(tokens) for tokens in kept.values())
        self._record_step(current.output, num_generated)
        if self.step_log is not None:
            self.step_log.record(current.output, sampled, num_generated)

    def _record_finished(self, state: RequestState, request: Request) -> None:
        state.sequence_metrics[request.request_id] = self.metrics.record_finished(request)

    def _record_step(self, output, num_generated: int) -> None:
        self.metrics.record_step(
            time.monotonic(), num_prompt_tokens=output.num_prefill_tokens, num_generated_tokens=num_generated,
            num_preemptions=len(output.preempted), num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting, kv_cache_utilization=self.allocator.utilization)

    def _lookahead(self) -> int:
        """Extra decode steps of the next call: none while prefill work is running or a waiting request
        could be admitted (a full batch keeps decoding several steps per call with a queue behind it)."""
        return self.scheduler.next_lookahead(self.config.decode_steps_per_call - 1)

    def _row(self, scheduled, state: RequestState, seq: SequenceState, request: Request) -> RowRequest:
        params = state.params
        # A step planned ahead starts after the tokens the in-flight step samples: count them as generated.
        num_tokens = request.num_tokens
        ahead = max(0, scheduled.end_position - num_tokens)
        num_generated = len(request.output_token_ids) + ahead
        remaining = self.max_sequence_length - num_tokens - ahead
        if params.max_tokens is not None:
            remaining = min(remaining, params.max_tokens - num_generated)
        # On-device early stop; before min_tokens no stop may fire (the host decides then).
        stop_ids = seq.ending_token_ids if num_generated >= params.min_tokens else ()
        # The token history is only read for prompt logprobs (of prefill rows): not copied per step otherwise.
        history = request.all_token_ids if params.prompt_logprobs is not None else ()
        return RowRequest(sampling_params=params, seed=seq.seed, num_generated=num_generated,
                          num_prompt_tokens=len(state.prompt_token_ids), all_token_ids=history,
                          max_new_tokens=max(remaining, 1), stop_ids=stop_ids)

    def _finish_sequence(self, sequence_id: str, reason: str, changed: dict) -> None:
        state, seq = self.sequences.pop(sequence_id)
        seq.finish(reason)
        changed[state.request_id] = state

    def _collect(self, changed: dict[str, RequestState]) -> list[RequestOutput]:
        outputs = []
        for request_id, state in changed.items():
            outputs.append(output := state.output())
            if output.finished:
                self.requests.pop(request_id, None)
        return outputs
