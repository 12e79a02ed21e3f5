"""The model runner: turns a SchedulerOutput into bucketed device arrays, runs the jitted step, and
returns each sequence's sampled tokens (and logprobs) as host data.

Owns: the device state (params split once, KV pools + sampler slots, donated each call), the
compiled functions of the bucket ladder and ``warmup()``. It makes no scheduling decisions.
Start-up: a runner made from the model's abstract values compiles its ladder from them
(``start_compiling``, in the background) while the weights load, then takes them (``bind_weights``).

``execute`` is ``collect(dispatch(...))``: ``dispatch`` builds the step's inputs and hands the compiled
program to the launch thread, returning a ``StepHandle`` at once; ``collect`` blocks until its tokens are
on the host. Async scheduling dispatches the next step in between; steps always run in dispatch order
(each takes the donated state the previous one returns), and each passes ``slot_tokens`` on to the next.
The launch thread exists because a call does not always return when its kernels are enqueued: XLA drives
a decode call's ``while`` loop (its multi-step decode) from the calling thread, reading the loop
predicate back every iteration, so that thread is held until the call's last iteration. Launched from
the engine's thread, the next step could only be planned after that, with the device idle meanwhile;
from the launch thread, the engine plans and builds it while the device runs the current one. That
call returns when its program is nearly done, and the device then idles until the launch thread starts
the next program, for which it needs the GIL: the engine thread, woken by the same return to
post-process the tokens, first waits for that start (``_await_next_call``).

Host cost per step is kept to a few Python operations per row (hundreds of rows per step at a large
batch): what stays with a batch slot while one sequence holds it (its page-table row, sampling
parameters, on-device stop ids) lives in ``SlotInputs`` and is rewritten only where it changed; a step
gathers its rows with one numpy index; its inputs go to the device as numpy arrays in one batched
``jax.device_put`` at dispatch (or, for a program not compiled yet, the call transfers them; either is
several times cheaper than a ``jnp.asarray`` each); and results come back as one
``SampledTokens`` per sequence converted with a few ``tolist`` calls rather than per-token numpy scalars.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.buckets import BucketLadder
from autoglm_jax.engine.executable_cache import (ExecutableCache, abstract_arguments, fingerprint, is_abstract,
                                                  same_arguments)
from autoglm_jax.engine.device_state import TOKEN_NOT_COUNTED, TOKEN_OUTPUT, TOKEN_PROMPT, DeviceState
from autoglm_jax.engine.memory import is_out_of_memory, park_on_host, program_need_bytes
from autoglm_jax.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from autoglm_jax.engine.step_functions import DecodeInput, StepInput, decode_loop, mixed_step
from autoglm_jax.engine.xla_options import gemm_compiler_options
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.sampler import SamplingTensors, HostRows

log = logging.getLogger(__name__)
HANDOFF_TIMEOUT_S = 0.05  # _await_next_call's bound (the launch thread normally starts the call in < 1 ms)
STOP_IDS_WIDTH = 16  # on-device stop ids per row in the decode loop (eos + stop_token_ids, padded)


class SampledTokens(NamedTuple):
    """The tokens one sequence sampled in a step, in order (n = 1 in a mixed step, up to 1 + its lookahead
    in a decode call), with the logprobs the request may want. The top-N arrays are the whole step's
    ([B, K, N]; K = 1 in a mixed step), sliced to this sequence's row only when read: most requests want
    no logprobs."""

    token_ids: list[int]
    logprobs: list[float]            # raw logprob of each sampled token
    ranks: list[int]                 # its 1-based rank
    step_top_token_ids: np.ndarray   # [B, K, N] int32
    step_top_logprobs: np.ndarray    # [B, K, N] f32
    row: int                         # this sequence's row b in them

    @property
    def top_token_ids(self) -> np.ndarray:
        """[n, N]: the ids of the N largest logprobs where each token was sampled."""
        return self.step_top_token_ids[self.row, : len(self.token_ids)]

    @property
    def top_logprobs(self) -> np.ndarray:
        """[n, N]: those logprobs, descending."""
        return self.step_top_logprobs[self.row, : len(self.token_ids)]


@dataclasses.dataclass
class PromptLogprob:
    """Logprob of prompt token at ``position`` (>= 1) given the tokens before it."""

    position: int
    token_id: int
    logprob: float
    rank: int
    top_token_ids: np.ndarray
    top_logprobs: np.ndarray


class RowRequest(NamedTuple):
    """What the runner needs to know about a scheduled sequence beyond the scheduler's entry (a named
    tuple: the engine builds one per running sequence per step)."""

    sampling_params: object        # SamplingParams
    seed: int
    num_generated: int             # output tokens before this step
    num_prompt_tokens: int
    all_token_ids: tuple[int, ...]  # prompt + outputs; only filled when prompt logprobs are wanted
    max_new_tokens: int            # tokens it may still generate (max_tokens / length limit)
    stop_ids: tuple[int, ...]      # eos (unless ignore_eos) + stop_token_ids, for on-device stops


@dataclasses.dataclass
class ProgramTiming:
    """Seconds one warmup program took: traced and lowered (serially, holding the GIL), then compiled."""

    key: tuple             # (kind, argument shapes...) as ``ModelRunner._program_key``
    lower_s: float
    compile_s: float = 0.0


def summarize_timings(timings: list[ProgramTiming]) -> str:
    """'trace+lower 12.3 s in all, compile max 30.1 s (mixed 512)' for a warmup log line."""
    if not timings:
        return "nothing traced"
    slowest = max(timings, key=lambda t: t.compile_s)
    return (f"trace+lower {sum(t.lower_s for t in timings):.1f} s in all, compile max {slowest.compile_s:.1f} s "
            f"({slowest.key[0]} {slowest.key[1][0] if slowest.key[1] else ''})")


@dataclasses.dataclass(frozen=True)
class StepHandle:
    """A dispatched step: its device outputs (maybe still being computed) and what ``collect`` needs."""

    scheduled: tuple[ScheduledSequence, ...]
    rows: dict[str, RowRequest]
    out: object                  # DecodeOutput or StepOutput of device arrays, or the launch thread's Future of it
    num_sampled: dict[str, int]  # tokens each sampling row yields unless it stops (schedule_ahead's input)
    query_start_loc: np.ndarray | None = None  # [rows + 1] flat token offsets of a mixed step
    want_prompt_logprobs: bool = False

    @property
    def is_decode(self) -> bool:
        return self.query_start_loc is None


class LaunchRecord(NamedTuple):
    """One step program called on the launch thread (``ModelRunner.launch_log``), perf_counter seconds."""

    kind: str        # "mixed" or "decode"
    t_submit: float  # handed to the launch thread (the engine thread's dispatch)
    t_enter: float   # the launch thread took it up (the previous call had returned)
    t_call: float    # the program call began (after the Python that builds its arguments)
    t_return: float  # the call returned (XLA returns after the program's last host-read predicate)


@dataclasses.dataclass(frozen=True)
class StepFunction:
    """A jitted step function and the XLA compiler options it compiles with (sorted (name, value) pairs)."""
    jitted: object
    options: tuple


class ModelRunner:
    def __init__(self, model: nnx.Module, model_config: ModelConfig, *, max_batch_size: int,
                 max_num_batched_tokens: int, max_sequence_length: int, page_size: int, num_pages: int,
                 cache_dtype, decode_steps_per_call: int, max_logprobs: int, eos_token_ids=(), mesh=None,
                 scan_layers: bool = True, executable_cache_dir: str | None = None, xla_gemm_backend: str = "auto",
                 single_row_decode: bool | None = None):
        """``model``: the model with its weights, or its abstract form (``nnx.eval_shape``, already
        unstacked when ``scan_layers=False``): then no device memory is touched, ``start_compiling``
        compiles the ladder from shapes alone, and ``bind_weights`` brings the weights and the KV pool.
        ``mesh``: a ("tp",) jax Mesh to serve a tensor-parallel model (``autoglm_jax.parallel``) over;
        None = the model's one device (the only case that may start abstract). ``scan_layers=False``
        unstacks the model's layer weights in place (``DecoderLayers.unstack``) so the steps run the
        layers unrolled over per-layer buffers. ``executable_cache_dir``: where warmup saves the compiled
        step programs and loads them from on the next start, skipping tracing (``executable_cache``;
        one device only, not over a mesh). ``xla_gemm_backend``: the GEMM emitter XLA compiles each step
        program with, by its rows (``engine.xla_options``). ``single_row_decode``: compile a 1-row decode
        program (``engine.buckets``); None = not on a GPU, where the 8-row one runs one sequence faster."""
        gemm_compiler_options(xla_gemm_backend, 1)  # ValueError naming the choices
        self.xla_gemm_backend = xla_gemm_backend
        self.config = model_config
        self.mesh = mesh
        self.scan_layers = scan_layers
        if not scan_layers:
            model.layers.unstack()
        self.graphdef, self.params = nnx.split(model)  # split once; never per step
        self.has_weights = not is_abstract(self.params)
        if single_row_decode is None:
            single_row_decode = jax.default_backend() != "gpu"
        self.ladder = BucketLadder(max_batch_size, max_num_batched_tokens, single_row_decode)
        self.max_batch_size = max_batch_size
        self.page_size = page_size
        self.num_pages = num_pages
        self.cache_dtype = cache_dtype
        self.max_pages_per_sequence = -(-max_sequence_length // page_size)
        self.decode_steps_per_call = decode_steps_per_call
        self.num_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        if mesh is None:
            self.state = self._pool_state() if self.has_weights else jax.eval_shape(self._pool_state)  # pool later
            self._make_single_device_steps()
        else:
            from autoglm_jax.parallel.sharded_steps import tensor_parallel_parts

            if not self.has_weights:
                raise ValueError("a tensor-parallel runner needs the model's weights (an abstract model has none)")
            self.state, mixed_fn, decode_fn = tensor_parallel_parts(
                self.graphdef, self.params, model_config, mesh, num_pages=num_pages, page_size=page_size,
                num_slots=max_batch_size, cache_dtype=cache_dtype)
            self._make_steps(mixed_fn, decode_fn)
        self.slot_tokens = self._zero_slot_tokens()  # [max_batch_size] int32: the last step's output
        self.slot_inputs = SlotInputs(max_batch_size, self.max_pages_per_sequence, self.eos_token_ids, STOP_IDS_WIDTH)
        self.num_traces = 0
        self.executable_cache = (ExecutableCache(executable_cache_dir) if executable_cache_dir and mesh is None
                                 else None)
        self.num_loaded_executables = 0
        self.compile_timings: list[ProgramTiming] = []  # one per program traced by the last compile
        self.compile_seconds = 0.0  # the last compile_programs call, loads included
        self._compiling: Future | None = None  # start_compiling's background compile
        self._stop_compiling = threading.Event()
        self._launcher: ThreadPoolExecutor | None = None  # the launch thread (module docstring), made on first use
        self._last_launch: Future | None = None
        self.launch_log: collections.deque | None = None  # a LaunchRecord per launched call while set (StepLog)
        self.call_started = 0.0  # perf_counter when the last program call began (``_run``)
        self._handoff = threading.Condition()  # the launch thread's progress, for _await_next_call
        self._launches_submitted = 0  # calls handed to the launch thread (engine thread)
        self._launches_called = 0     # of those, the last whose program call is about to begin (launch thread)

    def _make_steps(self, mixed_fn, decode_fn) -> None:
        self._step_fns = {"mixed": (self._counted(mixed_fn), ("num_logprobs",)),
                          "decode": (self._counted(decode_fn), ("max_steps", "num_logprobs"))}
        self._jitted: dict[tuple, StepFunction] = {}  # (kind, compiler options) -> the jitted step function
        # Warmed-up programs by (kind, argument shapes): called directly, so a program loaded from the
        # executable cache is never traced; shapes not warmed up go through the jitted functions.
        self._executables: dict[tuple, object] = {}

    def _make_single_device_steps(self) -> None:
        self._make_steps(functools.partial(mixed_step, self.graphdef), functools.partial(decode_loop, self.graphdef))

    def bind_weights(self, model: nnx.Module, allocate_pool: bool = True) -> None:
        """Gives a runner made from the abstract model its weights (unstacked here when ``scan_layers`` is
        off) and allocates the KV pool (``allocate_pool=False``: later, by ``allocate_pool()``, so the pool
        can still be resized meanwhile). Programs compiled meanwhile are kept when the weights have the
        abstract graph, shapes, dtypes and shardings they were compiled for; otherwise (a checkpoint whose
        weights differ, e.g. quantized) they are dropped, with a warning, and warmup compiles again."""
        if self.has_weights:
            raise ValueError("this runner has its weights already")
        if not self.scan_layers:
            model.layers.unstack()
        graphdef, params = nnx.split(model)
        if is_abstract(params):
            raise ValueError("bind_weights needs the model with its weights, got an abstract model")
        if graphdef != self.graphdef or not same_arguments(params, self.params):
            log.warning("the loaded weights differ from the abstract model the step programs were compiled "
                        "for (graph, shapes or dtypes); compiling again")
            self.cancel_compiling()
            self.graphdef = graphdef
            self._make_single_device_steps()
        self.params = params
        self.has_weights = True
        if allocate_pool:
            self.allocate_pool()

    def _pool_state(self) -> DeviceState:
        return DeviceState.create(self.config, self.num_pages, self.page_size, self.max_batch_size, self.cache_dtype)

    @property
    def pool_allocated(self) -> bool:
        return not is_abstract(self.state)

    def allocate_pool(self) -> None:
        """Allocates the KV pool and slot state of a runner made from the abstract model. If the device has
        the room but not in one piece (the weights' load fragmented it: ``memory.park_on_host``), the weights
        wait in host memory while the pool is allocated on the emptied device."""
        if self.pool_allocated:
            raise ValueError("the KV pool is allocated already")
        try:
            self.state = jax.block_until_ready(self._pool_state())
            return
        except jax.errors.JaxRuntimeError as error:
            if not self.has_weights or not is_out_of_memory(error) or jax.process_count() > 1:
                raise  # (a multi-host model's weights cannot be fetched whole to one host)
            log.warning("the KV pool (%d pages) found no contiguous room beside the weights: allocating it "
                        "with the weights moved to host memory meanwhile (%s)", self.num_pages,
                        str(error).splitlines()[0])
        restore = park_on_host(self.params)
        try:
            self.state = jax.block_until_ready(self._pool_state())
        finally:
            self.params = restore()

    def resize_pool(self, num_pages: int) -> None:
        """Plans a pool of ``num_pages`` instead, before it is allocated (one device). The programs compiled
        for the old pool shape are dropped, as for weights unlike the abstract model: warmup compiles again."""
        if self.mesh is not None or self.pool_allocated:
            raise ValueError("resize_pool needs a one-device runner whose KV pool is not allocated yet")
        self.cancel_compiling()
        self.num_pages = num_pages
        self.state = jax.eval_shape(self._pool_state)
        self._make_single_device_steps()

    def program_needs(self) -> dict[str, int]:
        """Device bytes each compiled ladder program needs beyond its arguments (``memory.program_need_bytes``),
        by name ("mixed 2048", "decode 256"); programs whose backend cannot say are left out."""
        needs = {}
        for key, compiled in self._executables.items():
            need = program_need_bytes(compiled)
            if need is not None:
                needs[f"{key[0]} {key[1][0] if key[1] else ''}".strip()] = need
        return needs

    def _zero_slot_tokens(self) -> jax.Array:
        """Placed like the state and the step outputs that replace it, so every call of a bucket has one
        jit signature: uncommitted on one device (as the state), replicated over a mesh."""
        zeros = np.zeros(self.max_batch_size, np.int32)
        if self.mesh is None:
            return jnp.asarray(zeros)
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(lambda: jnp.asarray(zeros), out_shardings=replicated)()

    def _counted(self, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.num_traces += 1  # runs only while tracing: counts (re)compilations
            return fn(*args, **kwargs)
        return traced

    # ------------------------------------------------------------------ warmup
    def start_compiling(self, compile_threads: int | None = None) -> None:
        """Starts ``compile_programs`` in a background thread: it needs only the abstract values of the
        weights and the KV pool, so it runs while the weights load (``bind_weights``); ``warmup`` waits for it."""
        if self._compiling is not None:
            raise ValueError("start_compiling was called already")
        pool = ThreadPoolExecutor(1, thread_name_prefix="warmup-trace")
        self._compiling = pool.submit(self.compile_programs, compile_threads)
        pool.shutdown(wait=False)

    def finish_compiling(self) -> None:
        """Waits for ``start_compiling``'s background compile (re-raising its error), if one was started.
        Its ladder stays the runner's (warmup does not compile again) until ``cancel_compiling``."""
        if self._compiling is not None:
            self._compiling.result()

    def cancel_compiling(self) -> None:
        """Stops ``start_compiling``'s background compile after the program it is tracing (the weights
        failed to load, or differ from the abstract model); waits for its compilations in flight. What
        it compiled is not used, so an error of it is logged, not raised."""
        self._stop_compiling.set()
        try:
            self.finish_compiling()
        except Exception:
            log.exception("the cancelled background compile failed")
        finally:
            self._compiling = None
            self._stop_compiling.clear()

    def compile_programs(self, compile_threads: int | None = None) -> int:
        """Compiles every bucket of the ladder from abstract arguments (no weight values, no KV pool
        needed); returns how many were traced. A program found in the executable cache is loaded, not
        traced (the loads run in parallel). The others are traced and lowered in this thread, one after
        another, each compiled (XLA releases the GIL) in ``compile_threads`` threads (default: one per
        CPU, at most one per program) while the next is traced, then saved to the cache. Steps then call
        these programs directly. ``compile_timings`` records each traced program's seconds and
        ``compile_seconds`` the whole call's."""
        began = time.perf_counter()
        params, state = abstract_arguments(self.params), abstract_arguments(self.state)
        programs = [("mixed", self._empty_step_input(tokens)) for tokens in self.ladder.token_buckets]
        programs += [("decode", self._empty_decode_input(rows)) for rows in self.ladder.decode_batches]
        programs = [(kind, self._step_function(kind, inp), self._replicated(inp), self._program_key(kind, inp))
                    for kind, inp in programs]
        fingerprints = [None] * len(programs)
        loaded = [None] * len(programs)
        workers = max(1, min(len(programs), compile_threads or os.cpu_count() or 1))
        self.compile_timings = []
        with ThreadPoolExecutor(workers, thread_name_prefix="warmup") as pool:
            if self.executable_cache is not None:  # loading releases the GIL: all programs at once
                fingerprints = [fingerprint(kind, self.graphdef, (params, state, inp),
                                            {**self._static_arguments(kind), "xla_options": repr(fn.options)})
                                for kind, fn, inp, _ in programs]
                loaded = list(pool.map(self.executable_cache.load, fingerprints))

            def compile_one(timing: ProgramTiming, fp, lowered):
                start = time.perf_counter()
                compiled = lowered.compile()
                timing.compile_s = time.perf_counter() - start
                self._executables[timing.key] = compiled
                if fp is not None:
                    self.executable_cache.save(fp, compiled)

            pending = []  # traced and lowered here, one after another; each compiles in the pool meanwhile
            for (kind, _, inp, key), fp, executable in zip(programs, fingerprints, loaded):
                if executable is not None:
                    self._executables[key] = executable
                    self.num_loaded_executables += 1
                    continue
                if self._stop_compiling.is_set():
                    break
                start = time.perf_counter()
                lowered = self.lower_step(kind, inp, params, state)
                self.compile_timings.append(timing := ProgramTiming(key, time.perf_counter() - start))
                pending.append(pool.submit(compile_one, timing, fp, lowered))
            for future in pending:
                future.result()
        self.compile_seconds = time.perf_counter() - began
        return len(pending)

    def warmup(self, compile_threads: int | None = None) -> float:
        """Compiles the ladder (``compile_programs``, or waits for ``start_compiling``'s), then runs each
        program once with empty (all-padding) inputs; returns seconds. Needs the weights."""
        if not self.has_weights or not self.pool_allocated:
            raise ValueError("warmup needs the weights and the KV pool: call bind_weights (and allocate_pool) first")
        self.wait_launched()
        start = time.perf_counter()
        if self._compiling is not None:
            self.finish_compiling()
        else:
            self.compile_programs(compile_threads)
        compiled_at = time.perf_counter()
        for tokens in self.ladder.token_buckets:
            self._run_mixed(self._empty_step_input(tokens))
        for rows in self.ladder.decode_batches:
            self._run_decode(self._empty_decode_input(rows))
        jax.block_until_ready(self.state)
        end = time.perf_counter()
        log.info("warmup: %d programs loaded from the executable cache, %d traced and compiled (%s), %.1f s "
                 "after warmup began; first runs %.1f s", self.num_loaded_executables, len(self.compile_timings),
                 summarize_timings(self.compile_timings), compiled_at - start, end - compiled_at)
        return end - start

    def _empty_step_input(self, token_bucket: int) -> StepInput:
        rows = self.ladder.rows_for_tokens(token_bucket)
        return self._step_input([], {}, token_bucket, rows, want_prompt_logprobs=False)

    def _empty_decode_input(self, rows: int) -> DecodeInput:
        return self._decode_input([], {}, rows, 1)

    # ------------------------------------------------------------------ execution
    def execute(self, output: SchedulerOutput, rows: dict[str, RowRequest]):
        """Runs one scheduled step. Returns (sampled, prompt_logprobs): sampled[request_id] is the
        SampledTokens of each sequence with ``sample=True``; prompt_logprobs[request_id] the list of
        PromptLogprob for this step's prompt tokens of requests that asked for them."""
        if not output.scheduled:
            return {}, {}
        return self.collect(self.dispatch(output, rows))

    def dispatch(self, output: SchedulerOutput, rows: dict[str, RowRequest]) -> StepHandle:
        """Enqueues one non-empty scheduled step on the device without waiting for it."""
        scheduled = output.scheduled
        if not scheduled:
            raise ValueError("dispatch() needs a scheduled sequence; an empty step runs nothing")
        if all(seq.is_decode for seq in scheduled):
            return self._dispatch_decode(scheduled, rows)
        return self._dispatch_mixed(scheduled, rows)

    def collect(self, handle: StepHandle):
        """Waits for a dispatched step; returns what ``execute`` returns."""
        out = self._fetch(handle.out)
        if handle.is_decode:
            return self._decode_results(handle.scheduled, out), {}
        return self._mixed_results(handle, out)

    def _fetch(self, out):
        """Device -> host: the one place the host waits for a step (``out``: its outputs, or the launch
        thread's Future of them; then also for the next program's call to begin: ``_await_next_call``)."""
        if isinstance(out, Future):
            result = out.result()
            self._await_next_call(out)
            out = result
        return jax.device_get(out)

    def _dispatch_mixed(self, scheduled, rows) -> StepHandle:
        starts = np.zeros(len(scheduled) + 1, np.int64)  # = md.query_start_loc, host side
        np.cumsum([len(seq.token_ids) for seq in scheduled], out=starts[1:])
        token_bucket = self.ladder.token_bucket(int(starts[-1]))
        row_bucket = self.ladder.rows_for_tokens(token_bucket)
        want = any(_wants_prompt_logprobs(rows[s.request_id]) and not s.is_decode for s in scheduled)
        inp = self._step_input(scheduled, rows, token_bucket, row_bucket, want, starts)
        num_sampled = {seq.request_id: 1 for seq in scheduled if seq.sample}
        return StepHandle(scheduled, rows, self._launch("mixed", inp), num_sampled, starts, want)

    def _mixed_results(self, handle: StepHandle, out):
        rows, want, starts = handle.rows, handle.want_prompt_logprobs, handle.query_start_loc
        s = out.sampled
        token_ids, logprobs, ranks = s.token_ids.tolist(), s.logprob.tolist(), s.rank.tolist()
        top_ids, top_logprobs = s.top_token_ids[:, None], s.top_logprobs[:, None]  # [B, 1, N]
        sampled, prompt = {}, {}
        for b, seq in enumerate(handle.scheduled):
            if seq.sample:
                sampled[seq.request_id] = SampledTokens([token_ids[b]], [logprobs[b]], [ranks[b]], top_ids, top_logprobs, b)
            if want and not seq.is_decode and _wants_prompt_logprobs(row := rows[seq.request_id]):
                prompt[seq.request_id] = self._prompt_entries(seq, row, out, int(starts[b]))
        return sampled, prompt

    def _prompt_entries(self, seq: ScheduledSequence, row: RowRequest, out, start: int):
        entries = []
        for i in range(seq.num_tokens):
            position = seq.start_position + i + 1  # logprob of the token at this position
            if position >= row.num_prompt_tokens:
                break
            t = start + i
            entries.append(PromptLogprob(position, row.all_token_ids[position], float(out.prompt_logprob[t]),
                                         int(out.prompt_rank[t]), out.prompt_top_ids[t], out.prompt_top[t]))
        return entries

    def _dispatch_decode(self, scheduled, rows) -> StepHandle:
        row_bucket = self.ladder.decode_batch(len(scheduled))
        steps = 1 + max(seq.num_lookahead_tokens for seq in scheduled)
        max_new = [_max_new(seq, rows[seq.request_id]) for seq in scheduled]
        inp = self._decode_input(scheduled, rows, row_bucket, steps, max_new)
        num_sampled = {seq.request_id: count for seq, count in zip(scheduled, max_new)}
        return StepHandle(scheduled, rows, self._launch("decode", inp), num_sampled)

    @staticmethod
    def _decode_results(scheduled, out):
        """One ``SampledTokens`` per row: the row's first ``num_generated`` of the call's [K, B] outputs."""
        token_ids, logprobs, ranks = out.token_ids.T.tolist(), out.logprob.T.tolist(), out.rank.T.tolist()
        counts = out.num_generated.tolist()
        top_ids, top_logprobs = out.top_token_ids.swapaxes(0, 1), out.top_logprobs.swapaxes(0, 1)  # [B, K, N]
        sampled = {}
        for b, seq in enumerate(scheduled):
            n = counts[b]
            sampled[seq.request_id] = SampledTokens(token_ids[b][:n], logprobs[b][:n], ranks[b][:n], top_ids,
                                                    top_logprobs, b)
        return sampled

    def _launch(self, kind: str, inp) -> Future | object:
        """Runs a dispatched step's program: on the launch thread (module docstring) when it is compiled
        already, returning a Future of its outputs; else here, after the launches before it, returning the
        outputs (a program traced on first use follows this thread's JAX configuration). Either way its
        ``slot_tokens`` input is the previous step's output, taken when the program starts."""
        run = self._run_decode if kind == "decode" else self._run_mixed
        if self._program_key(kind, inp) not in self._executables:
            self.wait_launched()
            return run(dataclasses.replace(inp, slot_tokens=self.slot_tokens))
        if self._launcher is None:
            self._launcher = ThreadPoolExecutor(1, thread_name_prefix="autoglm-launch")
        # The host inputs go to the device now, while the steps before this one run: made by the call, the
        # transfers would wait until the launch thread returns from the previous call (the device idle).
        inp = self._replicated(inp) if self.mesh is not None else jax.device_put(dataclasses.replace(inp, slot_tokens=None))
        launch_log, t_submit = self.launch_log, time.perf_counter()
        self._launches_submitted += 1
        index = self._launches_submitted

        def call():
            t_enter = time.perf_counter()
            args = dataclasses.replace(inp, slot_tokens=self.slot_tokens)
            with self._handoff:
                self._launches_called = index
                self._handoff.notify_all()
            out = run(args)
            if launch_log is not None:
                launch_log.append(LaunchRecord(kind, t_submit, t_enter, self.call_started, time.perf_counter()))
            return out

        self._last_launch = future = self._launcher.submit(call)
        future.launch_index = index
        return future

    def _await_next_call(self, future: Future) -> None:
        """After launch ``future``'s call returned: waits (GIL released) until the launch thread calls the
        step program handed over after it, if one was. The device is idle from the returned call's end
        until that program starts, and the launch thread needs the GIL to start it; the engine thread,
        about to post-process the returned call's tokens for ~10-20 ms of Python, would hold the GIL
        most of that time."""
        index = getattr(future, "launch_index", None)
        if index is None or self._launches_submitted <= index:
            return
        with self._handoff:
            self._handoff.wait_for(lambda: self._launches_called > index, timeout=HANDOFF_TIMEOUT_S)

    def wait_launched(self) -> None:
        """Returns once every dispatched step's program has been called (their outputs may still be
        computing); call it before touching ``state`` or ``slot_tokens`` outside ``dispatch``."""
        if self._last_launch is not None:
            concurrent.futures.wait([self._last_launch])

    def _step_function(self, kind: str, inp) -> StepFunction:
        """The jitted ``kind`` step for ``inp``'s shape, compiled with the XLA options of its matmul rows
        (a decode step's batch rows, a mixed step's token bucket); one jitted function per option set."""
        rows = inp.token_ids.shape[0]
        options = gemm_compiler_options(self.xla_gemm_backend, rows)
        key = (kind, tuple(sorted(options.items())))
        if key not in self._jitted:
            fn, static_argnames = self._step_fns[kind]
            self._jitted[key] = StepFunction(jax.jit(fn, static_argnames=static_argnames, donate_argnums=(1,),
                                                     compiler_options=options or None), key[1])
        return self._jitted[key]

    def _static_arguments(self, kind: str) -> dict:
        """The static keyword arguments of the ``kind`` step function."""
        if kind == "mixed":
            return {"num_logprobs": self.num_logprobs}
        return {"max_steps": self.decode_steps_per_call, "num_logprobs": self.num_logprobs}

    def lower_step(self, kind: str, inp, params=None, state=None):
        """The ``kind`` step lowered for ``inp`` as the engine compiles it (XLA options, static arguments),
        on ``params`` / ``state`` (default: the runner's own; abstract values work too)."""
        return self._step_function(kind, inp).jitted.lower(self.params if params is None else params,
                                                           self.state if state is None else state, inp,
                                                           **self._static_arguments(kind))

    @staticmethod
    def _program_key(kind: str, inp) -> tuple:
        return (kind, *(np.shape(x) for x in jax.tree.leaves(inp)))

    def _run_mixed(self, inp: StepInput):
        return self._run("mixed", inp)

    def _run_decode(self, inp: DecodeInput):
        return self._run("decode", inp)

    def _run(self, kind: str, inp):
        """Calls the ``kind`` program on ``inp`` (the compiled one, else the jitted function) with the
        runner's state, which it replaces; ``call_started`` is when the program call began."""
        inp = self._replicated(inp)
        program = self._executables.get(self._program_key(kind, inp))
        self.call_started = time.perf_counter()
        if program is not None:
            self.state, out = program(self.params, self.state, inp)
        else:
            self.state, out = self._step_function(kind, inp).jitted(self.params, self.state, inp,
                                                                     **self._static_arguments(kind))
        self.slot_tokens = out.slot_tokens
        return out

    def _replicated(self, inp):
        """Host-built inputs replicated over the mesh; ``slot_tokens`` (a step output) already is."""
        if self.mesh is None:
            return inp
        from autoglm_jax.parallel.sharded_steps import replicate_inputs

        host = replicate_inputs(dataclasses.replace(inp, slot_tokens=None), self.mesh)
        return dataclasses.replace(host, slot_tokens=inp.slot_tokens)

    # ------------------------------------------------------------------ host-side assembly
    def _step_input(self, scheduled, rows, token_bucket: int, num_rows: int, want_prompt_logprobs: bool,
                    starts: np.ndarray | None = None) -> StepInput:
        """``starts``: [rows + 1] flat offset of each sequence's tokens (computed here when not given)."""
        num_slots, n = self.max_batch_size, len(scheduled)
        slots = self.slot_inputs.update(scheduled, rows)
        index = self.slot_inputs.index(slots, num_rows)
        if starts is None:
            starts = np.zeros(n + 1, np.int64)
            np.cumsum([len(seq.token_ids) for seq in scheduled], out=starts[1:])
        query_lens = np.zeros(num_rows, np.int32)
        query_lens[:n] = np.diff(starts)
        before = np.zeros(num_rows, np.int32)
        before[:n] = [seq.start_position for seq in scheduled]
        total = int(starts[-1])
        token_ids = np.zeros(token_bucket, np.int32)
        token_ids[:total] = [t for seq in scheduled for t in seq.token_ids]
        token_kind = np.full(token_bucket, TOKEN_NOT_COUNTED, np.int32)
        next_ids = np.full(token_bucket, -1, np.int32)
        for b, seq in enumerate(scheduled):
            if seq.is_decode:
                continue
            row, offset = rows[seq.request_id], int(starts[b])
            positions = np.arange(seq.start_position, seq.end_position)
            token_kind[offset : offset + seq.num_tokens] = np.where(positions < row.num_prompt_tokens, TOKEN_PROMPT, TOKEN_OUTPUT)
            if want_prompt_logprobs and _wants_prompt_logprobs(row):
                nxt = positions + 1
                ok = nxt < row.num_prompt_tokens
                next_ids[offset : offset + seq.num_tokens][ok] = np.asarray(row.all_token_ids)[nxt[ok]]
        row_slots = np.full(num_rows, num_slots, np.int32)
        row_slots[:n] = slots
        reset_slots = np.full(num_rows, num_slots, np.int32)
        reset_slots[:n] = [seq.slot if seq.is_new else num_slots for seq in scheduled]
        sample_rows = np.zeros(num_rows, bool)
        sample_rows[:n] = [seq.sample for seq in scheduled]
        md = AttentionMetadata.build(before, query_lens, self.slot_inputs.page_table[index], self.page_size, token_bucket)
        # Each row's last token: md.query_start_loc[1:] - 1, from the host lengths (no device read-back).
        logits_indices = np.maximum(np.cumsum(query_lens, dtype=np.int32) - 1, 0).astype(np.int32)
        return StepInput(
            token_ids=token_ids, token_kind=token_kind, md=md, logits_indices=logits_indices, row_slots=row_slots,
            reset_slots=reset_slots, sample_rows=sample_rows, sampling=self._sampling(scheduled, rows, index),
            prompt_next_ids=next_ids, want_prompt_logprobs=np.asarray(want_prompt_logprobs, bool),
            slot_tokens=self.slot_tokens)

    def _decode_input(self, scheduled, rows, num_rows: int, steps: int, max_new: list[int] | None = None) -> DecodeInput:
        """``max_new``: each row's ``_max_new`` (computed here when not given)."""
        n = len(scheduled)
        slots = self.slot_inputs.update(scheduled, rows)
        index = self.slot_inputs.index(slots, num_rows)
        if max_new is None:
            max_new = [_max_new(seq, rows[seq.request_id]) for seq in scheduled]
        token_ids = np.zeros(num_rows, np.int32)
        token_ids[:n] = [seq.token_ids[0] for seq in scheduled]  # PENDING_TOKEN (< 0): fed from slot_tokens on device
        positions = np.zeros(num_rows, np.int32)
        positions[:n] = [seq.start_position for seq in scheduled]
        max_new_array = np.zeros(num_rows, np.int32)
        max_new_array[:n] = max_new
        return DecodeInput(
            token_ids=token_ids, positions=positions, page_table=self.slot_inputs.page_table[index],
            row_slots=index.astype(np.int32), sampling=self._sampling(scheduled, rows, index), max_new=max_new_array,
            stop_ids=self.slot_inputs.stop_ids[index], num_steps=np.asarray(steps, np.int32),
            slot_tokens=self.slot_tokens)

    def _sampling(self, scheduled, rows, index: np.ndarray) -> SamplingTensors:
        steps = [rows[seq.request_id].num_generated for seq in scheduled]
        return self.slot_inputs.sampling_tensors(index, steps)


class SlotInputs:
    """Host copies of the step inputs that stay with a batch slot while one sequence holds it, kept
    current incrementally: ``update`` rewrites a slot's row only when its sequence's pages, sampling
    parameters or on-device stop ids changed, and a step gathers its rows by slot (``index``). Each row
    always equals what a fresh build from the step's ``ScheduledSequence`` / ``RowRequest`` gives
    (tests/engine/test_slot_inputs.py). Row ``num_slots`` is the padding row: page 0 (scratch), greedy
    with every filter off, no stop ids.

        page_table           [num_slots + 1, MP] int32: the slot's pages in position order, 0 after them
        sampling[name]       [num_slots + 1]: ``SamplingTensors`` fields but ``step`` and ``stop_token_ids``
        min_tokens_stop_ids  [num_slots + 1, S] int32: eos + stop_token_ids, masked out once step >= min_tokens
        stop_ids             [num_slots + 1, S] int32: ids that end the row in the decode loop (-1 padding)
    """

    def __init__(self, num_slots: int, max_pages_per_sequence: int, eos_token_ids=(), stop_ids_width: int = 16):
        self.padding = num_slots
        self.eos_token_ids = tuple(eos_token_ids)
        self.page_table = np.zeros((num_slots + 1, max_pages_per_sequence), np.int32)
        self.sampling = HostRows(num_slots + 1).fields  # the defaults of an empty row
        del self.sampling["step"]
        self.min_tokens_stop_ids = np.full((num_slots + 1, stop_ids_width), -1, np.int32)
        self.stop_ids = np.full((num_slots + 1, stop_ids_width), -1, np.int32)
        self._pages: list[tuple[int, ...]] = [()] * (num_slots + 1)      # page_ids each row was written from
        self._params: list[tuple | None] = [None] * (num_slots + 1)     # (SamplingParams, seed) likewise
        self._stop_ids: list[tuple[int, ...]] = [()] * (num_slots + 1)  # RowRequest.stop_ids likewise

    def update(self, scheduled, rows) -> list[int]:
        """Brings the rows of the scheduled sequences' slots up to date; returns their slots in order."""
        slots = []
        for seq in scheduled:
            slot, row = seq.slot, rows[seq.request_id]
            slots.append(slot)
            pages, known = seq.page_ids, self._pages[slot]
            if pages is not known and not (len(pages) == len(known) and pages == known):
                self._write_pages(slot, pages)
            written = self._params[slot]
            if written is None or written[0] is not row.sampling_params or written[1] != row.seed:
                self._write_sampling(slot, row.sampling_params, row.seed)
            if row.stop_ids is not self._stop_ids[slot] and row.stop_ids != self._stop_ids[slot]:
                ids = row.stop_ids[: self.stop_ids.shape[1]]
                self.stop_ids[slot] = -1
                self.stop_ids[slot, : len(ids)] = ids
                self._stop_ids[slot] = row.stop_ids
        return slots

    def index(self, slots: list[int], num_rows: int) -> np.ndarray:
        """[num_rows] rows to gather: ``slots``, then the padding row."""
        index = np.full(num_rows, self.padding, np.intp)
        index[: len(slots)] = slots
        return index

    def sampling_tensors(self, index: np.ndarray, steps: list[int]) -> SamplingTensors:
        """The step's SamplingTensors (numpy) of rows ``index`` [B] that generated ``steps`` tokens."""
        fields = {name: column[index] for name, column in self.sampling.items()}
        step = np.zeros(len(index), np.int32)
        step[: len(steps)] = steps
        stop = np.where((step < fields["min_tokens"])[:, None], self.min_tokens_stop_ids[index], -1)
        return SamplingTensors(**fields, step=step, stop_token_ids=stop.astype(np.int32))

    def _write_pages(self, slot: int, pages: tuple[int, ...]) -> None:
        known = self._pages[slot]
        if len(pages) >= len(known) and pages[: len(known)] == known:  # grown: write the new pages only
            if len(pages) > len(known):
                self.page_table[slot, len(known) : len(pages)] = pages[len(known) :]
        else:  # another sequence (or a re-admitted one) holds the slot
            self.page_table[slot] = 0
            self.page_table[slot, : len(pages)] = pages
        self._pages[slot] = pages

    def _write_sampling(self, slot: int, params, seed: int) -> None:
        host = HostRows(1)
        host.fill(0, params, seed, -1, self.eos_token_ids)  # step -1 < min_tokens: records the min_tokens stop list
        for name, column in self.sampling.items():
            column[slot] = host.fields[name][0]
        ids = host.stop_lists[0] if params.min_tokens > 0 else []  # never active without min_tokens
        width = self.min_tokens_stop_ids.shape[1]
        if len(ids) > width:
            raise ValueError(f"{len(ids)} eos + stop token ids in one row exceed stop_ids_width={width}")
        self.min_tokens_stop_ids[slot] = -1
        self.min_tokens_stop_ids[slot, : len(ids)] = ids
        self._params[slot] = (params, seed)


def _max_new(seq: ScheduledSequence, row: RowRequest) -> int:
    """Tokens a decode row may sample in one call."""
    return min(1 + seq.num_lookahead_tokens, row.max_new_tokens)


def _wants_prompt_logprobs(row: RowRequest) -> bool:
    return getattr(row.sampling_params, "prompt_logprobs", None) is not None
