"""One decode step's tensor-parallel all-reduces: NCCL (lax.psum) vs our one-shot Pallas kernel, on the GPU.

Per TP size and batch: checks the kernel's sum against a float32 reference on fresh random per-device
inputs (every shard must hold the bit-identical result), then times ``count`` chained all-reduces of
[batch, hidden] in one jitted program (straight-line, as in the decode step with its layers unrolled:
GLM-4-9B has 2 per layer x 40 layers + the embedding's = 81) for both implementations, and a variant
with a [batch, 4096] x [4096, 4096] matmul between the all-reduces (the o_proj / down_proj they follow)
to show the collective's cost inside a realistic step. Prints a markdown table for benchmarks/RESULTS.md.
``--processes=N``: the same psum timings with the devices in N processes of one job, one GPU each
(``_local_job``), as a multi-host engine runs (the one-shot kernel needs one process: not timed there).

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/allreduce.py --tp=2 --batch=1,8,64,256
    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/allreduce.py --tp=2 --processes=2
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

import _local_job
from _timing import time_ms
from pallas_kernels.all_reduce import one_shot_all_reduce, supports

FLAGS = flags.FLAGS
flags.DEFINE_list("tp", ["2"], "TP sizes (devices 0..tp-1).")
flags.DEFINE_list("batch", ["1", "8", "64", "256"], "Rows of the all-reduced [batch, hidden] activations.")
flags.DEFINE_integer("hidden", 4096, "Hidden size (GLM-4-9B: 4096).")
flags.DEFINE_integer("count", 81, "All-reduces per step.")
flags.DEFINE_string("dtype", "bfloat16", "Activation dtype.")
flags.DEFINE_integer("processes", 1, "Processes of one job holding the devices (one GPU each when > 1); "
                     "TP must then be the job's device count.")
flags.DEFINE_bool("profile", False, "Also trace one step of each implementation at the first batch size: device busy "
                  "share and the top kernels (where the time goes: the collective itself or the gaps around it).")

IMPLS = {"psum": lambda x: jax.lax.psum(x, "tp"), "one_shot": lambda x: one_shot_all_reduce(x, "tp")}


def check(mesh, batch: int, dtype) -> float:
    """Relative error of the kernel's sum vs float32; raises if shards disagree."""
    tp = mesh.devices.size
    x = jax.random.normal(jax.random.key(batch), (tp * batch, FLAGS.hidden), jnp.float32).astype(dtype)
    x = jax.device_put(x, NamedSharding(mesh, P("tp")))
    run = jax.jit(jax.shard_map(IMPLS["one_shot"], mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))
    out = np.asarray(run(x).astype(jnp.float32)).reshape(tp, batch, FLAGS.hidden)
    ref = np.asarray(x.astype(jnp.float32)).reshape(tp, batch, FLAGS.hidden).sum(0)
    for shard in range(1, tp):
        if not np.array_equal(out[shard], out[0]):
            raise AssertionError(f"tp={tp} batch={batch}: shard {shard} differs from shard 0")
    return float(np.linalg.norm(out[0] - ref) / np.linalg.norm(ref))


def chained(mesh, impl: str, with_matmul: bool):
    reduce = IMPLS[impl]

    def body(x, w):
        for _ in range(FLAGS.count):
            y = x @ w if with_matmul else x
            x = reduce(y) * jnp.asarray(0.5, x.dtype)  # data-dependent chain: nothing is CSE'd away
        return x

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False))


def replicated(mesh, make):
    """``make()``'s array replicated over ``mesh`` (built on the devices: works when they span processes)."""
    return jax.jit(make, out_shardings=NamedSharding(mesh, P()))()


def main(argv):
    del argv
    if _local_job.is_child():
        _local_job.join()
    elif FLAGS.processes > 1:
        sys.exit(_local_job.launch(FLAGS.processes))
    multi = jax.process_count() > 1
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    impls = ["psum"] if multi else list(IMPLS)
    dtype = jnp.dtype(FLAGS.dtype)
    say(f"== {jax.devices()[0].device_kind} x{jax.device_count()} in {jax.process_count()} process(es), jax "
        f"{jax.__version__}, hidden {FLAGS.hidden}, {FLAGS.count} all-reduces per step, {dtype}")
    say("| tp | processes | batch | kernel rel. err | psum ms/step | one-shot ms/step | psum µs each | one-shot µs each "
        "| + matmul: psum ms | + matmul: one-shot ms | speed-up |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for tp in map(int, FLAGS.tp):
        if multi and tp != jax.device_count():
            raise ValueError(f"--tp={tp}: with --processes the mesh is every device of the job ({jax.device_count()})")
        mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
        for batch in map(int, FLAGS.batch):
            x = replicated(mesh, lambda: jnp.ones((batch, FLAGS.hidden), dtype))
            reason = "one process only" if multi else supports(x)
            err = f"{check(mesh, batch, dtype):.1e}" if reason is None else f"(psum: {reason})"
            w = replicated(mesh, lambda: (jax.random.normal(jax.random.key(1), (FLAGS.hidden, FLAGS.hidden), jnp.float32)
                                          * 0.01).astype(dtype))
            times = {(impl, mm): time_ms(chained(mesh, impl, mm), x, w) for impl in impls for mm in (False, True)}
            ms = lambda impl, mm, fmt: format(times[impl, mm], fmt) if (impl, mm) in times else "–"
            each = lambda impl: f"{1e3 * times[impl, False] / FLAGS.count:.1f}" if (impl, False) in times else "–"
            speedup = f"{times['psum', True] / times['one_shot', True]:.2f}x" if ("one_shot", True) in times else "–"
            say(f"| {tp} | {jax.process_count()} | {batch} | {err} | {ms('psum', False, '.3f')} | "
                f"{ms('one_shot', False, '.3f')} | {each('psum')} | {each('one_shot')} | {ms('psum', True, '.3f')} | "
                f"{ms('one_shot', True, '.3f')} | {speedup} |", flush=True)
        if FLAGS.profile:
            profile(mesh, int(FLAGS.batch[0]), dtype, impls)


def profile(mesh, batch: int, dtype, impls: list[str]) -> None:
    from autoglm_jax.tools.device_profile import profile_device

    x = replicated(mesh, lambda: jnp.ones((batch, FLAGS.hidden), dtype))
    w = replicated(mesh, lambda: jnp.ones((FLAGS.hidden, FLAGS.hidden), dtype))
    for impl in impls:
        run = chained(mesh, impl, True)
        summary = profile_device(lambda: jax.block_until_ready(run(x, w)), warmup=2)
        if jax.process_index() == 0:
            print(f"    profile {impl} tp={mesh.devices.size} batch={batch} (+ matmul): "
                  + summary.format(6).replace("\n", "\n    "), flush=True)


if __name__ == "__main__":
    app.run(main)
