"""The model runner: turns a SchedulerOutput into bucketed device arrays, runs the jitted step, and
returns each sequence's sampled tokens (and logprobs) as host data.

Owns: the device state (params split once, KV pools + sampler slots, donated each call), the
compiled functions of the bucket ladder and ``warmup()``. It makes no scheduling decisions.

``execute`` is ``collect(dispatch(...))``: ``dispatch`` only enqueues the step (JAX async dispatch)
and returns a ``StepHandle``; ``collect`` blocks until its tokens are on the host. Async scheduling
dispatches the next step in between; steps always run in dispatch order (each takes the donated
state the previous one returns), and each passes ``slot_tokens`` on to the next.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.buckets import BucketLadder
from autoglm_jax.engine.executable_cache import ExecutableCache, fingerprint
from autoglm_jax.engine.device_state import TOKEN_NOT_COUNTED, TOKEN_OUTPUT, TOKEN_PROMPT, DeviceState
from autoglm_jax.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from autoglm_jax.engine.step_functions import DecodeInput, StepInput, decode_loop, mixed_step
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.sampler import SamplingTensors

log = logging.getLogger(__name__)
STOP_IDS_WIDTH = 16  # on-device stop ids per row in the decode loop (eos + stop_token_ids, padded)


@dataclasses.dataclass
class TokenResult:
    """One sampled token of one sequence, with the logprobs the request may want."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: np.ndarray  # [N]
    top_logprobs: np.ndarray   # [N]


@dataclasses.dataclass
class PromptLogprob:
    """Logprob of prompt token at ``position`` (>= 1) given the tokens before it."""

    position: int
    token_id: int
    logprob: float
    rank: int
    top_token_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """What the runner needs to know about a scheduled sequence beyond the scheduler's entry."""

    sampling_params: object        # SamplingParams
    seed: int
    num_generated: int             # output tokens before this step
    num_prompt_tokens: int
    all_token_ids: tuple[int, ...]  # prompt + outputs; only filled when prompt logprobs are wanted
    max_new_tokens: int            # tokens it may still generate (max_tokens / length limit)
    stop_ids: tuple[int, ...]      # eos (unless ignore_eos) + stop_token_ids, for on-device stops


@dataclasses.dataclass(frozen=True)
class StepHandle:
    """A dispatched step: its device outputs (maybe still being computed) and what ``collect`` needs."""

    scheduled: tuple[ScheduledSequence, ...]
    rows: dict[str, RowRequest]
    out: object                  # DecodeOutput or StepOutput of device arrays
    num_sampled: dict[str, int]  # tokens each sampling row yields unless it stops (schedule_ahead's input)
    query_start_loc: np.ndarray | None = None  # [rows + 1] flat token offsets of a mixed step
    want_prompt_logprobs: bool = False

    @property
    def is_decode(self) -> bool:
        return self.query_start_loc is None


class ModelRunner:
    def __init__(self, model: nnx.Module, model_config: ModelConfig, *, max_batch_size: int,
                 max_num_batched_tokens: int, max_sequence_length: int, page_size: int, num_pages: int,
                 cache_dtype, decode_steps_per_call: int, max_logprobs: int, eos_token_ids=(), mesh=None,
                 scan_layers: bool = True, executable_cache_dir: str | None = None):
        """``mesh``: a ("tp",) jax Mesh to serve a tensor-parallel model (``autoglm_jax.parallel``) over;
        None = the model's one device. ``scan_layers=False`` unstacks the model's layer weights in place
        (``DecoderLayers.unstack``) so the steps run the layers unrolled over per-layer buffers.
        ``executable_cache_dir``: where ``warmup`` saves the compiled step programs and loads them from
        on the next start, skipping tracing (``executable_cache``; one device only, not over a mesh)."""
        self.config = model_config
        self.mesh = mesh
        if not scan_layers:
            model.layers.unstack()
        self.graphdef, self.params = nnx.split(model)  # split once; never per step
        self.ladder = BucketLadder(max_batch_size, max_num_batched_tokens)
        self.max_batch_size = max_batch_size
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_sequence = -(-max_sequence_length // page_size)
        self.decode_steps_per_call = decode_steps_per_call
        self.num_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        mixed_fn, decode_fn = functools.partial(mixed_step, self.graphdef), functools.partial(decode_loop, self.graphdef)
        if mesh is None:
            self.state = DeviceState.create(model_config, num_pages, page_size, max_batch_size, cache_dtype)
        else:
            from autoglm_jax.parallel.sharded_steps import tensor_parallel_parts

            self.state, mixed_fn, decode_fn = tensor_parallel_parts(
                self.graphdef, self.params, model_config, mesh, num_pages=num_pages, page_size=page_size,
                num_slots=max_batch_size, cache_dtype=cache_dtype)
        self.slot_tokens = self._zero_slot_tokens()  # [max_batch_size] int32: the last step's output
        self.num_traces = 0
        self._mixed = jax.jit(self._counted(mixed_fn), static_argnames=("num_logprobs",), donate_argnums=(1,))
        self._decode = jax.jit(self._counted(decode_fn), static_argnames=("max_steps", "num_logprobs"),
                               donate_argnums=(1,))
        # Warmed-up programs by (kind, argument shapes): called directly, so a program loaded from the
        # executable cache is never traced; shapes not warmed up go through the jitted functions.
        self._executables: dict[tuple, object] = {}
        self.executable_cache = (ExecutableCache(executable_cache_dir) if executable_cache_dir and mesh is None
                                 else None)
        self.num_loaded_executables = 0

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
    def warmup(self, compile_threads: int | None = None) -> float:
        """Compiles every bucket of the ladder with empty (all-padding) inputs, then runs each once;
        returns seconds. A program found in the executable cache is loaded, not traced (the loads run in
        parallel). The others are traced and lowered in this thread, one after another, each compiled
        (XLA releases the GIL) in ``compile_threads`` threads (default: one per CPU, at most one per
        program) while the next is traced, then saved to the cache. Steps then call these programs
        directly, so the runs below compile nothing."""
        start = time.perf_counter()
        mixed = [self._empty_step_input(tokens) for tokens in self.ladder.token_buckets]
        decode = [self._empty_decode_input(rows) for rows in self.ladder.decode_batches]
        programs = [("mixed", self._mixed, inp, {"num_logprobs": self.num_logprobs}) for inp in mixed]
        programs += [("decode", self._decode, inp, {"max_steps": self.decode_steps_per_call,
                                                     "num_logprobs": self.num_logprobs}) for inp in decode]
        programs = [(kind, fn, (self.params, self.state, self._replicated(inp)), static, self._program_key(kind, inp))
                    for kind, fn, inp, static in programs]
        fingerprints = [None] * len(programs)
        loaded = [None] * len(programs)
        workers = max(1, min(len(programs), compile_threads or os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="warmup") as pool:
            if self.executable_cache is not None:  # loading releases the GIL: all programs at once
                fingerprints = [fingerprint(kind, self.graphdef, args, static) for kind, _, args, static, _ in programs]
                loaded = list(pool.map(self.executable_cache.load, fingerprints))

            def compile_one(key, fp, lowered):
                compiled = lowered.compile()
                self._executables[key] = compiled
                if fp is not None:
                    self.executable_cache.save(fp, compiled)

            pending = []  # traced and lowered here, one after another; each compiles in the pool meanwhile
            for (kind, fn, args, static, key), fp, executable in zip(programs, fingerprints, loaded):
                if executable is not None:
                    self._executables[key] = executable
                    self.num_loaded_executables += 1
                else:
                    pending.append(pool.submit(compile_one, key, fp, fn.lower(*args, **static)))
            for future in pending:
                future.result()
        compiled_at = time.perf_counter()
        for inp in mixed:
            self._run_mixed(inp)
        for inp in decode:
            self._run_decode(inp)
        jax.block_until_ready(self.state)
        end = time.perf_counter()
        log.info("warmup: %d programs loaded from the executable cache, %d traced and compiled, in %.1f s; "
                 "first runs %.1f s", self.num_loaded_executables, len(pending), compiled_at - start, end - compiled_at)
        return end - start

    def _empty_step_input(self, token_bucket: int) -> StepInput:
        rows = self.ladder.rows_for_tokens(token_bucket)
        return self._step_input([], {}, token_bucket, rows, want_prompt_logprobs=False)

    def _empty_decode_input(self, rows: int) -> DecodeInput:
        return self._decode_input([], {}, rows, 1)

    # ------------------------------------------------------------------ execution
    def execute(self, output: SchedulerOutput, rows: dict[str, RowRequest]):
        """Runs one scheduled step. Returns (sampled, prompt_logprobs): sampled[request_id] is the list
        of TokenResult for sequences with ``sample=True``; prompt_logprobs[request_id] the list of
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
        """Device -> host: the one place the host waits for a step."""
        return jax.device_get(out)

    def _dispatch_mixed(self, scheduled, rows) -> StepHandle:
        num_tokens = sum(seq.num_tokens for seq in scheduled)
        token_bucket = self.ladder.token_bucket(num_tokens)
        row_bucket = self.ladder.rows_for_tokens(token_bucket)
        want = any(_wants_prompt_logprobs(rows[s.request_id]) and not s.is_decode for s in scheduled)
        inp = self._step_input(scheduled, rows, token_bucket, row_bucket, want)
        num_sampled = {seq.request_id: 1 for seq in scheduled if seq.sample}
        starts = np.cumsum([0] + [seq.num_tokens for seq in scheduled])  # = md.query_start_loc, host side
        return StepHandle(scheduled, rows, self._run_mixed(inp), num_sampled, starts, want)

    def _mixed_results(self, handle: StepHandle, out):
        rows, want, starts = handle.rows, handle.want_prompt_logprobs, handle.query_start_loc
        sampled, prompt = {}, {}
        for b, seq in enumerate(handle.scheduled):
            if seq.sample:
                s = out.sampled
                sampled[seq.request_id] = [TokenResult(int(s.token_ids[b]), float(s.logprob[b]), int(s.rank[b]),
                                                       s.top_token_ids[b], s.top_logprobs[b])]
            row = rows[seq.request_id]
            if want and _wants_prompt_logprobs(row) and not seq.is_decode:
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
        inp = self._decode_input(scheduled, rows, row_bucket, steps)
        num_sampled = {seq.request_id: _max_new(seq, rows[seq.request_id]) for seq in scheduled}
        return StepHandle(scheduled, rows, self._run_decode(inp), num_sampled)

    @staticmethod
    def _decode_results(scheduled, out):
        sampled = {}
        for b, seq in enumerate(scheduled):
            n = int(out.num_generated[b])
            sampled[seq.request_id] = [
                TokenResult(int(out.token_ids[k, b]), float(out.logprob[k, b]), int(out.rank[k, b]),
                            out.top_token_ids[k, b], out.top_logprobs[k, b]) for k in range(n)]
        return sampled

    @staticmethod
    def _program_key(kind: str, inp) -> tuple:
        return (kind, *(np.shape(x) for x in jax.tree.leaves(inp)))

    def _run_mixed(self, inp: StepInput):
        inp = self._replicated(inp)
        program = self._executables.get(self._program_key("mixed", inp))
        if program is not None:
            self.state, out = program(self.params, self.state, inp)
        else:
            self.state, out = self._mixed(self.params, self.state, inp, num_logprobs=self.num_logprobs)
        self.slot_tokens = out.slot_tokens
        return out

    def _run_decode(self, inp: DecodeInput):
        inp = self._replicated(inp)
        program = self._executables.get(self._program_key("decode", inp))
        if program is not None:
            self.state, out = program(self.params, self.state, inp)
        else:
            self.state, out = self._decode(self.params, self.state, inp, max_steps=self.decode_steps_per_call,
                                           num_logprobs=self.num_logprobs)
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
    def _page_table(self, scheduled, num_rows: int) -> np.ndarray:
        table = np.zeros((num_rows, self.max_pages_per_sequence), np.int32)
        for b, seq in enumerate(scheduled):
            table[b, : len(seq.page_ids)] = seq.page_ids
        return table

    def _sampling(self, scheduled, rows, num_rows: int) -> SamplingTensors:
        params = [rows[s.request_id].sampling_params for s in scheduled]
        seeds = [rows[s.request_id].seed for s in scheduled]
        steps = [rows[s.request_id].num_generated for s in scheduled]
        return SamplingTensors.from_params(params, seeds, steps, num_rows, self.eos_token_ids,
                                           stop_ids_width=STOP_IDS_WIDTH)

    def _step_input(self, scheduled, rows, token_bucket: int, num_rows: int, want_prompt_logprobs: bool) -> StepInput:
        num_slots = self.max_batch_size
        query_lens = np.zeros(num_rows, np.int32)
        before = np.zeros(num_rows, np.int32)
        token_ids = np.zeros(token_bucket, np.int32)
        token_kind = np.full(token_bucket, TOKEN_NOT_COUNTED, np.int32)
        next_ids = np.full(token_bucket, -1, np.int32)
        row_slots = np.full(num_rows, num_slots, np.int32)
        reset_slots = np.full(num_rows, num_slots, np.int32)
        sample_rows = np.zeros(num_rows, bool)
        offset = 0
        for b, seq in enumerate(scheduled):
            row = rows[seq.request_id]
            n = seq.num_tokens
            query_lens[b], before[b] = n, seq.start_position
            token_ids[offset : offset + n] = seq.token_ids
            if not seq.is_decode:
                positions = np.arange(seq.start_position, seq.end_position)
                token_kind[offset : offset + n] = np.where(positions < row.num_prompt_tokens, TOKEN_PROMPT, TOKEN_OUTPUT)
                if want_prompt_logprobs and _wants_prompt_logprobs(row):
                    nxt = positions + 1
                    ok = nxt < row.num_prompt_tokens
                    next_ids[offset : offset + n][ok] = np.asarray(row.all_token_ids)[nxt[ok]]
            row_slots[b] = seq.slot
            if seq.is_new:
                reset_slots[b] = seq.slot
            sample_rows[b] = seq.sample
            offset += n
        md = AttentionMetadata.build(before, query_lens, self._page_table(scheduled, num_rows), self.page_size, token_bucket)
        logits_indices = np.maximum(np.asarray(md.query_start_loc)[1:] - 1, 0).astype(np.int32)
        return StepInput(
            token_ids=jnp.asarray(token_ids), token_kind=jnp.asarray(token_kind), md=md,
            logits_indices=jnp.asarray(logits_indices), row_slots=jnp.asarray(row_slots),
            reset_slots=jnp.asarray(reset_slots), sample_rows=jnp.asarray(sample_rows),
            sampling=self._sampling(scheduled, rows, num_rows), prompt_next_ids=jnp.asarray(next_ids),
            want_prompt_logprobs=jnp.asarray(want_prompt_logprobs), slot_tokens=self.slot_tokens)

    def _decode_input(self, scheduled, rows, num_rows: int, steps: int) -> DecodeInput:
        token_ids = np.zeros(num_rows, np.int32)
        positions = np.zeros(num_rows, np.int32)
        row_slots = np.full(num_rows, self.max_batch_size, np.int32)
        max_new = np.zeros(num_rows, np.int32)
        stop_ids = np.full((num_rows, STOP_IDS_WIDTH), -1, np.int32)
        for b, seq in enumerate(scheduled):
            row = rows[seq.request_id]
            token_ids[b] = seq.token_ids[0]  # scheduler.PENDING_TOKEN (< 0): fed from slot_tokens on device
            positions[b] = seq.start_position
            row_slots[b] = seq.slot
            max_new[b] = _max_new(seq, row)
            ids = row.stop_ids[:STOP_IDS_WIDTH]
            stop_ids[b, : len(ids)] = ids
        return DecodeInput(
            token_ids=jnp.asarray(token_ids), positions=jnp.asarray(positions),
            page_table=jnp.asarray(self._page_table(scheduled, num_rows)), row_slots=jnp.asarray(row_slots),
            sampling=self._sampling(scheduled, rows, num_rows), max_new=jnp.asarray(max_new),
            stop_ids=jnp.asarray(stop_ids), num_steps=jnp.asarray(steps, jnp.int32), slot_tokens=self.slot_tokens)


def _max_new(seq: ScheduledSequence, row: RowRequest) -> int:
    """Tokens a decode row may sample in one call."""
    return min(1 + seq.num_lookahead_tokens, row.max_new_tokens)


def _wants_prompt_logprobs(row: RowRequest) -> bool:
    return getattr(row.sampling_params, "prompt_logprobs", None) is not None
