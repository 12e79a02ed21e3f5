"""Decode throughput at a real model shape (default GLM-4-9B-0414) with random bf16 weights made on the device.

For each attention backend (our Pallas kernels, plain XLA), batch size and context length: the engine's
jitted multi-step decode loop (``engine.step_functions.decode_loop`` through ``ModelRunner``), timed
over ``--steps`` tokens per call (a batch padded to the runner's decode bucket, as the engine pads it: on a GPU
one sequence runs the 8-row program), reported as tokens/s, ms/step and the fraction of the decode roofline
(the weights a step reads + KV bytes per step over the HBM bandwidth measured in the same run; an untied input
embedding table is gathered, not read, so it is left out). The transformers
baseline at the same shape is ``benchmarks/hf_decode.py``, run after this process exits (JAX holds most of
the GPU memory while it runs):

    PYTHONPATH=. python3 benchmarks/decode.py --batch=1,8,64 --context=1024,4096 && \
      PYTHONPATH=. python3 benchmarks/hf_decode.py --batch=1 --context=1024

``--kv_cache_dtype=fp8`` runs either mode over a float8 e4m3fn KV pool (its bytes in the roofline).

``--engine`` decodes through ``EngineCore`` instead (scheduler, host input assembly and output
processing included) with async scheduling off, then on, in the same engine: tokens/s, ms per decode
step, the same compiled decode program's ms per step called back to back (the "engine overhead" column:
1 - that / the engine's, the host's share), and the device busy share of a profiler trace of
back-to-back engine steps. The trace's share understates the untraced engine's on a GPU: under CUPTI
each CUDA-graph launch inside a decode call's ``while`` loop leaves the device idle ~1.5 ms (H100,
session 10: traced kernel time per step ~ the untraced back-to-back step), so read it for where gaps
sit (its long-gap table), not for their size. Python functions are traced only with --profile_python.
On CPU the PjRt CPU client's executions stand in for the device:

    PYTHONPATH=. python3 benchmarks/decode.py --engine --batch=64 --context=1024 --steps=8
    PYTHONPATH=. .venv/bin/python benchmarks/decode.py --engine --model=tiny-glm4 --dtype=float32 \
      --batch=4 --context=64 --engine_tokens=32      # CPU smoke run
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _timing import batch_ms, copy_bandwidth

from autoglm_jax.checkpoint.loader import build_model
from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.engine.memory import program_need_bytes
from autoglm_jax.engine.runner import STOP_IDS_WIDTH, ModelRunner
from autoglm_jax.engine.step_log import format_step_summary
from autoglm_jax.engine.step_functions import DecodeInput
from autoglm_jax.model.attention import to_cache_dtype
from autoglm_jax.model.kv_cache import KVCache, resolve_kv_cache_dtype
from autoglm_jax.sampler import SamplingTensors
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tools.device_profile import backend_planes, profile_device

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-0414", "Preset (random weights).")
flags.DEFINE_list("batch", ["1", "8", "64"], "Batch sizes.")
flags.DEFINE_list("context", ["1024", "4096"], "Context lengths (tokens already in the cache).")
flags.DEFINE_list("backends", ["pallas", "xla"], "Attention backends.")
flags.DEFINE_integer("steps", 16, "Decode steps per jitted call.")
flags.DEFINE_list("xla_gemm_backends", ["auto"], "Runner mode: ModelRunner xla_gemm_backend values to measure "
                  "(engine.xla_options: auto, triton, cublas), each with every attention backend.")
flags.DEFINE_list("mixed_tokens", [], "Runner mode: also time the mixed (prefill) step program at these token "
                  "buckets (powers of two), on all-padding input: every GEMM at full M, attention skipped.")
flags.DEFINE_integer("page_size", EngineConfig.page_size, "KV page size (default: the engine's).")
flags.DEFINE_list("scan_layers", ["false"], "Layer loops to measure: false = unrolled over per-layer weight buffers "
                  "(the engine's GPU default), true = lax.scan over the stacked weights.")
flags.DEFINE_bool("engine", False, "Decode through EngineCore with async scheduling off and on (see the docstring); "
                  "--steps is its decode_steps_per_call.")
flags.DEFINE_integer("engine_tokens", 64, "--engine: timed decode tokens per sequence and mode.")
flags.DEFINE_integer("profile_steps", 6, "--engine: engine steps traced for the device busy share.")
flags.DEFINE_bool("profile_python", False, "--engine: trace Python functions too (names the host code in long "
                  "idle gaps, but the tracer slows the host several-fold: the busy share then understates the "
                  "untraced engine's).")
flags.DEFINE_integer("profile_top", 5, "--engine: the most expensive device ops printed from the trace.")
flags.DEFINE_bool("profile_by_kind", False, "--engine: merge the printed ops by kind (gemm_fusion_dot.N -> "
                  "gemm_fusion_dot), e.g. with XLA_FLAGS=--xla_gpu_enable_command_buffer= to see every kernel.")
flags.DEFINE_integer("max_logprobs", 0, "Runner mode: top logprobs every decode step computes (the engine's "
                     "max_logprobs; 20 by default there, 0 here).")
flags.DEFINE_bool("memory_analysis", False, "Runner mode: print the device bytes each decode program needs beyond "
                  "its arguments (what the engine's KV pool leaves free for it: memory.program_need_bytes).")
flags.DEFINE_bool("profile_runner", False, "Runner mode: also trace one call per shape and print its --profile_top ops "
                  "(by kind with --profile_by_kind) and idle gaps.")
flags.DEFINE_string("dtype", "bfloat16", "--engine: weights/activations/KV dtype (float32 for a CPU smoke run).")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"], "KV pool dtype (EngineConfig.kv_cache_dtype): "
                  "auto = the model's (bf16 in runner mode), fp8 = float8 e4m3fn pages.")


def decode_input(batch: int, context: int, runner: ModelRunner, steps: int) -> DecodeInput:
    """``batch`` sequences at ``context`` tokens, padded to the runner's decode bucket as the engine pads
    them (on a GPU one sequence runs the 8-row program: ``engine.buckets``); padding rows take the padding
    slot, page 0 and no tokens."""
    rows = runner.ladder.decode_batch(batch)
    pages_per_seq = runner.max_pages_per_sequence
    table = np.zeros((rows, pages_per_seq), np.int32)
    for b in range(batch):
        table[b] = 1 + b * pages_per_seq + np.arange(pages_per_seq)
    rng = np.random.default_rng(batch)
    sampling = SamplingTensors.from_params([None] * batch, [0] * batch, [0] * batch, rows, (),
                                           stop_ids_width=STOP_IDS_WIDTH)
    real = np.arange(rows) < batch
    return DecodeInput(
        token_ids=jnp.asarray(np.where(real, rng.integers(0, runner.config.vocab_size, rows), 0), jnp.int32),
        positions=jnp.asarray(np.where(real, context, 0), jnp.int32), page_table=jnp.asarray(table),
        row_slots=jnp.asarray(np.where(real, np.arange(rows), runner.max_batch_size), jnp.int32),
        sampling=sampling, max_new=jnp.asarray(np.where(real, steps, 0), jnp.int32),
        stop_ids=jnp.full((rows, STOP_IDS_WIDTH), -1, jnp.int32),
        num_steps=jnp.asarray(steps, jnp.int32), slot_tokens=runner.slot_tokens)


def decode_ms_per_step(runner: ModelRunner, inp: DecodeInput, repeats: int = 5) -> float:
    """Median wall ms per decode step of ``repeats`` back-to-back calls of the runner's (compiled) decode
    program on ``inp`` (``--steps`` steps each), each waited for."""
    return statistics.median(batch_ms(runner._run_decode, inp, iterations=1) for _ in range(repeats)) / FLAGS.steps


def streamed_parameters(config: ModelConfig) -> int:
    """Parameters a decode step reads from HBM: all but an untied input-embedding table, of which a step
    gathers one row per token. (Until session 11 the roofline counted every parameter: 1.24 GB of
    GLM-4-9B's 18.8 GB that no step reads, which overstated the fraction of roofline by ~7% at batch 1.)"""
    return config.num_parameters() - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)


def step_matmul_flops(config: ModelConfig, tokens: int, sampled_rows: int) -> float:
    """FLOPs of a step's GEMMs: every token through the decoder layers, the lm_head for sampled rows only."""
    lm_head = config.vocab_size * config.hidden_size
    return 2.0 * tokens * (streamed_parameters(config) - lm_head) + 2.0 * sampled_rows * lm_head


def run_backend(config: ModelConfig, backend: str, gemm: str, scan_layers: bool, batches, contexts,
                bandwidth: float, weight_bytes: int):
    model = build_model(config, None, jnp.bfloat16, backend)
    max_context = max(contexts) + FLAGS.steps + 1
    pages_per_seq = -(-max_context // FLAGS.page_size)
    mixed_tokens = [int(t) for t in FLAGS.mixed_tokens]
    cache_dtype = resolve_kv_cache_dtype(FLAGS.kv_cache_dtype, jnp.bfloat16)
    runner = ModelRunner(model, config, max_batch_size=max(batches),
                         max_num_batched_tokens=max(batches + mixed_tokens),
                         max_sequence_length=pages_per_seq * FLAGS.page_size, page_size=FLAGS.page_size,
                         num_pages=max(batches) * pages_per_seq + 1, cache_dtype=cache_dtype,
                         decode_steps_per_call=FLAGS.steps, max_logprobs=FLAGS.max_logprobs, scan_layers=scan_layers,
                         xla_gemm_backend=gemm)
    # never time on zeros; the zeroed pool is donated, so the random one takes its place (no second pool)
    fill = jax.jit(lambda a, key: to_cache_dtype(jax.random.normal(key, a.shape, jnp.bfloat16), a.dtype),
                   donate_argnums=0)
    kv = runner.state.kv
    runner.state = runner.state.__class__(kv=KVCache(k=fill(kv.k, jax.random.key(1)), v=fill(kv.v, jax.random.key(2))),
                                          output_counts=runner.state.output_counts, prompt_mask=runner.state.prompt_mask)
    del kv
    rows = []
    label = (backend + (" scan" if scan_layers else "") + ("" if gemm == "auto" else f" {gemm}")
             + ("" if FLAGS.kv_cache_dtype == "auto" else " fp8 KV"))
    for tokens in mixed_tokens:
        if tokens not in runner.ladder.token_buckets:
            raise app.UsageError(f"--mixed_tokens={tokens} is not a token bucket {runner.ladder.token_buckets}")
        inp = runner._empty_step_input(tokens)
        jax.block_until_ready(runner._run_mixed(inp))
        ms = statistics.median(batch_ms(runner._run_mixed, inp, iterations=1) for _ in range(5))  # a step a call
        tflops = step_matmul_flops(config, tokens, runner.ladder.rows_for_tokens(tokens)) / ms / 1e9
        print(f"{label:11s} mixed {tokens:5d} tokens (all padding): {ms:7.2f} ms, GEMMs {tflops:5.0f} TFLOP/s",
              flush=True)
        rows.append((label + " mixed (padding)", tokens, 0, tokens / ms * 1e3, ms, float("nan"), 0.0))
    per_token_kv = KVCache.bytes_per_page(config, 1, cache_dtype)
    for batch in batches:
        for context in contexts:
            inp = decode_input(batch, context, runner, FLAGS.steps)
            if FLAGS.memory_analysis:  # before the first call: the analysis compiles the program on its own
                need = program_need_bytes(runner.lower_step("decode", inp).compile())
                need = "unknown" if need is None else f"{need / 2**30:.2f} GiB"
                print(f"{label:11s} decode program, {runner.ladder.decode_batch(batch)} rows: needs {need} beyond "
                      f"its arguments (memory.program_need_bytes)", flush=True)
            start = time.perf_counter()
            jax.block_until_ready(runner._run_decode(inp))
            compile_s = time.perf_counter() - start
            ms_step = decode_ms_per_step(runner, inp)
            kv_bytes = batch * (context + FLAGS.steps / 2) * per_token_kv
            roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
            if FLAGS.profile_runner:
                profile = profile_device(lambda r=runner, i=inp: r._run_decode(i), warmup=0)
                print((profile.by_kind() if FLAGS.profile_by_kind else profile).format(FLAGS.profile_top), flush=True)
            program = runner.ladder.decode_batch(batch)
            name = label if program == batch else f"{label} ({program}-row program)"
            rows.append((name, batch, context, batch / ms_step * 1e3, ms_step, roofline_ms / ms_step, compile_s))
            print(f"{name:11s} batch {batch:4d} ctx {context:5d}: {batch / ms_step * 1e3:9.1f} tok/s "
                  f"{ms_step:7.2f} ms/step  roofline {roofline_ms:6.2f} ms ({roofline_ms / ms_step:.2f})  "
                  f"first call {compile_s:.1f} s", flush=True)
    del runner, model
    return rows


def engine_core(batch: int, context: int) -> EngineCore:
    """An engine for ``batch`` sequences of ``context`` prompt tokens with room for both modes' tokens;
    the KV pool is sized for exactly that (not from free memory). The ladder compiles up front, in parallel
    (warmup, as serving does; compiled one bucket at a time on first use, a batch-64 x 1k run did not fit
    four minutes on an H100)."""
    budget = max(512, batch)
    # Early requests decode one token per mixed call while later ones still prefill: room for those too
    # (without it a batch-64 x 1k run finished its requests before the timed decode and never ended).
    prefill_calls = -(-batch * context // budget) + 2
    tokens = context + prefill_calls + FLAGS.engine_tokens + (FLAGS.profile_steps + 4) * FLAGS.steps + 16
    pages = -(-tokens // FLAGS.page_size)
    return EngineCore(model=FLAGS.model, dtype=FLAGS.dtype, skip_tokenizer_init=True, warmup=True,
                      show_progress=False, max_batch_size=batch, max_sequence_length=pages * FLAGS.page_size,
                      max_num_batched_tokens=budget, page_size=FLAGS.page_size,
                      num_pages=batch * pages + 1, decode_steps_per_call=FLAGS.steps,
                      kv_cache_dtype=FLAGS.kv_cache_dtype)


def engine_decode(core: EngineCore, batch: int, context: int, async_scheduling: bool):
    """(tok/s, ms per decode step, DeviceProfile) of ``batch`` sequences decoding after ``context``
    prompt tokens through ``core.step()``; the requests are aborted afterwards."""
    core.async_scheduling = async_scheduling
    rng = np.random.default_rng(context)
    vocab = core.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=core.max_sequence_length - context, ignore_eos=True)
    ids = [core.add_request({"prompt_token_ids": rng.integers(10, vocab - 10, context).tolist()}, params).request_id
           for _ in range(batch)]
    t0 = time.perf_counter()
    while core.scheduler.num_waiting or any(r.num_uncomputed_tokens != 1 for r in core.scheduler.running):
        core.step()  # prefill
    t1 = time.perf_counter()
    for _ in range(2):  # compiles and warms this batch's decode bucket
        core.step()
    print(f"  async {'on' if async_scheduling else 'off'}: prefill {t1 - t0:.1f} s, first decode calls "
          f"{time.perf_counter() - t1:.1f} s", flush=True)
    generated = lambda: sum(r.num_output_tokens for r in core.scheduler.running)  # noqa: E731
    log = core.enable_step_log()  # host busy vs blocked per call, without a profiler's overhead
    before, start = generated(), time.perf_counter()
    while generated() - before < batch * FLAGS.engine_tokens:
        if len(core.scheduler.running) < batch:
            raise RuntimeError(f"only {len(core.scheduler.running)} of {batch} requests still decoding: the engine "
                               "was sized too small for the timed decode")
        core.step()
    elapsed, tokens = time.perf_counter() - start, generated() - before
    core.disable_step_log()
    print(f"  timed decode {elapsed:.1f} s\n    " + format_step_summary(log.summary()).replace("\n", "\n    "), flush=True)
    profile = profile_device(lambda: [core.step() for _ in range(FLAGS.profile_steps)] and None, warmup=0,
                             python_tracer=FLAGS.profile_python, **backend_planes())
    for request_id in ids:
        core.abort(request_id)
    return tokens / elapsed, 1e3 * elapsed / (tokens / batch), profile, program_ms_per_step(core, batch, context)


def program_ms_per_step(core: EngineCore, batch: int, context: int) -> float:
    """ms per step of the engine's own compiled decode program called back to back through its runner
    (synthetic rows at the context the timed decode reached; no scheduler or host work between calls):
    the device-bound floor the engine's ms/step is compared with. Call after the requests are aborted
    (it writes into their pages)."""
    core.runner.wait_launched()  # a step dispatched ahead may still be on the launch thread
    inp = decode_input(batch, context + FLAGS.engine_tokens, core.runner, FLAGS.steps)
    jax.block_until_ready(core.runner._run_decode(inp))
    return decode_ms_per_step(core.runner, inp)


def run_engine(batches, contexts) -> None:
    rows = []
    for batch in batches:
        for context in contexts:
            core = engine_core(batch, context)
            for mode in (False, True):
                rate, ms_step, profile, program_ms = engine_decode(core, batch, context, mode)
                busy = f"{profile.busy_fraction:.1%}" if profile.num_devices else "n/a"
                rows.append((batch, context, "on" if mode else "off", rate, ms_step, busy, program_ms))
                print(f"engine batch {batch:4d} ctx {context:5d} async {rows[-1][2]:3s}: {rate:9.1f} tok/s "
                      f"{ms_step:7.2f} ms/step  device busy {busy} of {profile.span_ms:.1f} ms traced; the same program "
                      f"back to back {program_ms:.2f} ms/step (engine overhead {1 - program_ms / ms_step:.1%})",
                      flush=True)
                print("    " + (profile.by_kind() if FLAGS.profile_by_kind else profile).format(FLAGS.profile_top).replace("\n", "\n    "), flush=True)
            del core
    print("\n| batch | context | async scheduling | tok/s | ms/step | device busy (trace) | same program back to back "
          "(ms/step) | engine overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]} | {r[6]:.2f} | {1 - r[6] / r[4]:.1%} |")


def main(argv):
    del argv
    batches = [int(b) for b in FLAGS.batch]
    contexts = [int(c) for c in FLAGS.context]
    if FLAGS.engine:
        print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}; {FLAGS.model} ({FLAGS.dtype}, random weights, "
              f"KV cache {FLAGS.kv_cache_dtype}) through EngineCore, {FLAGS.steps} decode steps per call", flush=True)
        run_engine(batches, contexts)
        return
    config = ModelConfig.from_preset(FLAGS.model)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth()
    weight_bytes = streamed_parameters(config) * 2
    print(f"{device.device_kind}; jax {jax.__version__}; {FLAGS.model}: {config.num_parameters() / 1e9:.2f} B params; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights read per step {weight_bytes / 1e9:.2f} GB -> batch-1 floor "
          f"{weight_bytes / bandwidth * 1e3:.2f} ms/step", flush=True)
    rows = []
    for scan in FLAGS.scan_layers:
        for gemm in FLAGS.xla_gemm_backends:
            for backend in FLAGS.backends:
                rows += run_backend(config, backend, gemm, scan.lower() in ("true", "1"), batches, contexts,
                                    bandwidth, weight_bytes)
    print("\n| backend (layers unrolled unless 'scan'; XLA GEMMs if not auto) | batch (mixed: tokens) | context | tok/s | ms/step | fraction of roofline | first call (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f} |")


if __name__ == "__main__":
    app.run(main)
