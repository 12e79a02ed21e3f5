"""Multi-GPU decode: tensor-parallel latency/throughput and data-parallel offline throughput.

Random bf16 weights are made on the devices, already in their TP shards (no host copy of the model),
and decoding runs through the engine itself (scheduler + the jitted multi-step decode loop), so the
figures are what serving gets. Per TP size and batch: ms per decode step, tokens/s, speed-up vs the
smallest TP size, and the all-reduce time per step (the same number of psums of the same activation
size over the "tp" axis, timed alone). Per DP backend and size: offline throughput (prefill + decode,
dp x batch requests) and speed-up vs one engine in this process (``--dp_backend``: "process" = one OS
process per replica, "thread" = replicas stepped from threads here; process dp=1 shows the front's cost).
Not a test; record results in benchmarks/RESULTS.md. The process replicas need the GPUs' memory, so this
process runs with XLA_PYTHON_CLIENT_PREALLOCATE=false when they are measured (set here unless given).
``--processes=N``: TP over N processes of one job, one GPU each (``_local_job``; the engine of
``parallel.multihost``: process 0 schedules and broadcasts each step's plan), decode rows only, TP = N.

    .venv/bin/python benchmarks/multi_gpu.py --model=glm-4-9b-0414 --tp=1,2 --dp=1,2 --batch=1,64
    .venv/bin/python benchmarks/multi_gpu.py --tp=1,2,4 --dp=1,4 --batch=1,64      # issue 10, 4 GPUs
    .venv/bin/python benchmarks/multi_gpu.py --tp= --dp=1,2 --dp_backend=process,thread --batch=64   # DP only
    .venv/bin/python benchmarks/multi_gpu.py --tp=2 --dp= --processes=2 --batch=1,64   # TP=2 as two processes
    # CPU smoke run: XLA_FLAGS=--xla_force_host_platform_device_count=8 ... --model=tiny-glm4 --dtype=float32
"""

from __future__ import annotations

import gc
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import _local_job
from _timing import time_ms
from absl import app, flags
from jax.sharding import PartitionSpec as P

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.parallel.mesh import TP_AXIS, engine_mesh
from autoglm_jax.parallel.replicas import replicated_engine_core
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tools.device_profile import profile_device

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-0414", "Model preset (random weights).")
flags.DEFINE_list("tp", ["1", "2"], "Tensor-parallel sizes to measure decode at.")
flags.DEFINE_list("dp", ["1", "2"], "Data-parallel replica counts for offline throughput (tp=1 each).")
flags.DEFINE_list("dp_backend", ["process", "thread"], "Data-parallel backends to measure (EngineConfig."
                  "data_parallel_backend): process, thread.")
flags.DEFINE_list("batch", ["1", "64"], "Decode batch sizes.")
flags.DEFINE_integer("context", 512, "Prompt tokens of each sequence (decode reads this much KV).")
flags.DEFINE_integer("decode_tokens", 64, "Timed decode tokens per sequence.")
flags.DEFINE_integer("offline_tokens", 128, "Output tokens per request in the DP throughput run.")
flags.DEFINE_integer("steps_per_call", 8, "Decode steps per jitted call (engine decode_steps_per_call).")
flags.DEFINE_string("dtype", "bfloat16", "Weights, activations and KV dtype.")
flags.DEFINE_bool("allreduce_only", False, "Only time each TP size's per-step all-reduces (no model): for "
                  "comparing XLA collective flags, see benchmarks/allreduce_flags.py.")
flags.DEFINE_integer("processes", 1, "Processes of one job holding the GPUs (one each when > 1): TP over all of "
                     "them through the multi-host engine (--tp must be the job's device count, --dp empty).")
flags.DEFINE_bool("profile", True, "Profile a few engine steps per (tp, batch): device busy share (host overhead "
                  "= the idle rest) and the top kernels (collectives included).")


def engine_args(max_batch: int) -> dict:
    """Engine settings; the KV pool is sized for exactly this workload (not from free memory), so the
    engines of successive configurations fit on the same GPUs one after another."""
    max_len = FLAGS.context + max(FLAGS.decode_tokens, FLAGS.offline_tokens) + 64
    num_pages = max_batch * -(-max_len // EngineConfig.page_size) + 1  # the engine's default page size
    return dict(model=FLAGS.model, dtype=FLAGS.dtype, skip_tokenizer_init=True, warmup=False, show_progress=False,
                max_batch_size=max_batch, max_sequence_length=max_len, max_num_batched_tokens=512,
                num_pages=num_pages, decode_steps_per_call=FLAGS.steps_per_call)


def release(core) -> None:
    """Drops an engine and its device buffers before the next configuration allocates its own."""
    del core
    gc.collect()  # the runner's jitted closures form reference cycles


def prompts(count: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(10, vocab - 10, FLAGS.context).tolist()} for _ in range(count)]


def _num_devices(core: EngineCore) -> int:
    return len(core.mesh.devices.flat) if core.mesh is not None else 1


def decode_rate(core: EngineCore, batch: int) -> tuple[float, float]:
    """(ms per decode step, tokens/s) of ``batch`` sequences decoding at ~context tokens."""
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    ids = [core.add_request(p, params).request_id for p in prompts(batch, core.model_config.vocab_size)]
    decoding = lambda: (core.scheduler.num_waiting == 0 and  # noqa: E731
                        all(r.num_uncomputed_tokens == 1 for r in core.scheduler.running))
    while not decoding():
        core.step()
    for _ in range(2):  # compile + warm the decode bucket of this batch
        core.step()
    jax.effects_barrier()
    generated = lambda: sum(r.num_output_tokens for r in core.scheduler.running)  # noqa: E731
    before, start = generated(), time.perf_counter()
    while generated() - before < batch * FLAGS.decode_tokens:
        core.step()
    elapsed = time.perf_counter() - start
    tokens = generated() - before
    if FLAGS.profile:  # engine steps back to back: what the device does, and how long it waits for the host
        summary = profile_device(lambda: [core.step() for _ in range(3)] and None, warmup=0)
        print(f"    profile tp={_num_devices(core)} batch={batch}: "
              + summary.by_kind().format(10).replace("\n", "\n    "), flush=True)  # per-layer copies merged
    for request_id in ids:
        core.abort(request_id)
    return 1e3 * elapsed / (tokens / batch), tokens / elapsed


def allreduce_ms_per_step(mesh, config: ModelConfig, batch: int) -> float:
    """Time of one decode step's collectives alone: 2 psums of [batch, H] per layer + the embedding's."""
    if mesh is None:
        return 0.0
    count = 2 * config.num_hidden_layers + 1
    dtype = jnp.dtype(FLAGS.dtype)

    def body(x):  # straight-line, as in the step with its layers unrolled
        for _ in range(count):
            x = jax.lax.psum(x, TP_AXIS) * jnp.asarray(0.5, x.dtype)  # data-dependent: no CSE
        return x

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    return time_ms(run, jnp.ones((batch, config.hidden_size), dtype))


def bench_tp(batches: list[int]) -> None:
    config = ModelConfig.from_preset(FLAGS.model)
    base: dict[int, float] = {}
    print(f"\n== decode, {FLAGS.model}, context {FLAGS.context}, {FLAGS.dtype}, {jax.devices()[0].device_kind}")
    print(f"{'tp':>3} {'batch':>5} {'ms/step':>9} {'tok/s':>10} {'speed-up':>9} {'all-reduce ms/step':>19}")
    for tp in map(int, FLAGS.tp):
        core = EngineCore(engine_args(max(batches)), tensor_parallel_size=tp)
        for batch in batches:
            ms, rate = decode_rate(core, batch)
            base.setdefault(batch, ms)
            ar = allreduce_ms_per_step(core.mesh, config, batch)
            print(f"{tp:>3} {batch:>5} {ms:>9.2f} {rate:>10.1f} {base[batch] / ms:>8.2f}x {ar:>19.3f}", flush=True)
        release(core)


def bench_tp_processes(batches: list[int]) -> None:
    """TP over every device of the job (``--processes``): process 0 drives the engine and prints, the
    others run its broadcast plans. No all-reduce column: the followers only run engine steps
    (``benchmarks/allreduce.py --processes`` times the collectives of such a job)."""
    from autoglm_jax.parallel import multihost

    core = EngineCore(engine_args(max(batches)), mesh=multihost.global_tp_mesh())
    if jax.process_index() != 0:
        multihost.follow(core)
        return
    core = multihost.lead(core)
    print(f"\n== decode, {FLAGS.model}, context {FLAGS.context}, {FLAGS.dtype}, {jax.devices()[0].device_kind}, "
          f"TP over {jax.process_count()} processes")
    print(f"{'tp':>3} {'batch':>5} {'ms/step':>9} {'tok/s':>10}")
    try:
        for batch in batches:
            ms, rate = decode_rate(core, batch)
            print(f"{_num_devices(core):>3} {batch:>5} {ms:>9.2f} {rate:>10.1f}", flush=True)
    finally:
        multihost.stop()


def offline_throughput(core, num_requests: int) -> float:
    """Generated tokens/s of ``num_requests`` requests added at once and run to completion (any front)."""
    params = SamplingParams(temperature=0, max_tokens=FLAGS.offline_tokens, ignore_eos=True)
    vocab = core.model_config.vocab_size
    for p in prompts(num_requests, vocab, seed=1):
        core.add_request(p, params)
    start, tokens = time.perf_counter(), 0
    while core.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in core.step() if o.finished)
    return tokens / (time.perf_counter() - start)


def dp_rate(build, num_requests: int) -> float:
    """Offline throughput of the engine or front ``build()`` makes; it is closed and freed afterwards."""
    core = build()
    offline_throughput(core, num_requests)  # the same run once untimed: compiles every bucket it uses
    rate = offline_throughput(core, num_requests)
    if hasattr(core, "close"):
        core.close()  # a DP front: stops its replica processes / threads
    del core
    gc.collect()  # as release(): the engine's device buffers go before the next one allocates
    return rate


def bench_dp(batch: int) -> None:
    print(f"\n== offline throughput, {FLAGS.model}, {batch} requests per replica, "
          f"{FLAGS.context} prompt + {FLAGS.offline_tokens} output tokens each")
    print(f"{'backend':>8} {'dp':>3} {'requests':>8} {'tok/s':>10} {'speed-up':>9}")
    base = dp_rate(lambda: EngineCore(engine_args(batch)), batch)  # one engine in this process
    print(f"{'engine':>8} {1:>3} {batch:>8} {base:>10.1f} {1:>8.2f}x", flush=True)
    for backend in FLAGS.dp_backend:
        for dp in map(int, FLAGS.dp):
            if dp == 1 and backend == "thread":  # the same as the engine above
                continue
            config = EngineConfig.from_dict(engine_args(batch), data_parallel_size=dp, data_parallel_backend=backend)
            rate = dp_rate(lambda: replicated_engine_core(config), dp * batch)
            print(f"{backend:>8} {dp:>3} {dp * batch:>8} {rate:>10.1f} {rate / base:>8.2f}x", flush=True)


def main(argv):
    del argv
    batches = sorted(map(int, FLAGS.batch))
    if _local_job.is_child():
        _local_job.join()
    elif FLAGS.processes > 1:
        sys.exit(_local_job.launch(FLAGS.processes))
    if jax.process_count() > 1:
        if FLAGS.dp or FLAGS.tp != [str(jax.device_count())]:
            raise ValueError(f"with --processes: --tp={jax.device_count()} (every device of the job) and --dp= "
                             f"(got --tp={','.join(FLAGS.tp)} --dp={','.join(FLAGS.dp)})")
        bench_tp_processes(batches)
        return
    if FLAGS.dp and "process" in FLAGS.dp_backend:  # before JAX starts here: the replica processes need the memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    if FLAGS.tp:
        engine_mesh(max(map(int, FLAGS.tp)), 1)  # fails early when there are too few devices
    if FLAGS.allreduce_only:
        config = ModelConfig.from_preset(FLAGS.model)
        for tp in (t for t in map(int, FLAGS.tp) if t > 1):
            for batch in batches:
                ms = allreduce_ms_per_step(engine_mesh(tp, 1), config, batch)
                print(f"ALLREDUCE tp={tp} batch={batch} ms_per_step={ms:.3f}", flush=True)
        return
    if FLAGS.tp:
        bench_tp(batches)
    if FLAGS.dp:
        bench_dp(max(batches))


if __name__ == "__main__":
    app.run(main)
