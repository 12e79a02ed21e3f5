"""Decode throughput at a real model shape (default GLM-4-9B-0414) with random bf16 weights made on the device.

For each attention backend (our Pallas kernels, plain XLA), batch size and context length: the engine's
jitted multi-step decode loop (``engine.step_functions.decode_loop`` through ``ModelRunner``), timed
over ``--steps`` tokens per call, reported as tokens/s, ms/step and the fraction of the decode roofline
(weights + KV bytes per step over the HBM bandwidth measured in the same run). The transformers
baseline at the same shape is ``benchmarks/hf_decode.py``, run after this process exits (JAX holds most of
the GPU memory while it runs):

    PYTHONPATH=. python3 benchmarks/decode.py --batch=1,8,64 --context=1024,4096 && \
      PYTHONPATH=. python3 benchmarks/hf_decode.py --batch=1 --context=1024
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _timing import copy_bandwidth

from autoglm_jax.checkpoint.loader import build_model
from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.runner import STOP_IDS_WIDTH, ModelRunner
from autoglm_jax.engine.step_functions import DecodeInput
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.sampler import SamplingTensors

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-0414", "Preset (random weights).")
flags.DEFINE_list("batch", ["1", "8", "64"], "Batch sizes.")
flags.DEFINE_list("context", ["1024", "4096"], "Context lengths (tokens already in the cache).")
flags.DEFINE_list("backends", ["pallas", "xla"], "Attention backends.")
flags.DEFINE_integer("steps", 16, "Decode steps per jitted call.")
flags.DEFINE_integer("page_size", 16, "KV page size.")
flags.DEFINE_list("scan_layers", ["false"], "Layer loops to measure: false = unrolled over per-layer weight buffers "
                  "(the engine's GPU default), true = lax.scan over the stacked weights.")


def decode_input(batch: int, context: int, runner: ModelRunner, steps: int) -> DecodeInput:
    pages_per_seq = runner.max_pages_per_sequence
    table = np.zeros((batch, pages_per_seq), np.int32)
    for b in range(batch):
        table[b] = 1 + b * pages_per_seq + np.arange(pages_per_seq)
    rng = np.random.default_rng(batch)
    sampling = SamplingTensors.from_params([None] * batch, [0] * batch, [0] * batch, batch, (),
                                           stop_ids_width=STOP_IDS_WIDTH)
    return DecodeInput(
        token_ids=jnp.asarray(rng.integers(0, runner.config.vocab_size, batch), jnp.int32),
        positions=jnp.full((batch,), context, jnp.int32), page_table=jnp.asarray(table),
        row_slots=jnp.arange(batch, dtype=jnp.int32), sampling=sampling,
        max_new=jnp.full((batch,), steps, jnp.int32), stop_ids=jnp.full((batch, STOP_IDS_WIDTH), -1, jnp.int32),
        num_steps=jnp.asarray(steps, jnp.int32))


def run_backend(config: ModelConfig, backend: str, scan_layers: bool, batches, contexts, bandwidth: float,
                weight_bytes: int):
    model = build_model(config, None, jnp.bfloat16, backend)
    max_context = max(contexts) + FLAGS.steps + 1
    pages_per_seq = -(-max_context // FLAGS.page_size)
    runner = ModelRunner(model, config, max_batch_size=max(batches), max_num_batched_tokens=max(batches),
                         max_sequence_length=pages_per_seq * FLAGS.page_size, page_size=FLAGS.page_size,
                         num_pages=max(batches) * pages_per_seq + 1, cache_dtype=jnp.bfloat16,
                         decode_steps_per_call=FLAGS.steps, max_logprobs=0, scan_layers=scan_layers)
    # never time on zeros; the zeroed pool is donated, so the random one takes its place (no second pool)
    fill = jax.jit(lambda a, key: jax.random.normal(key, a.shape, a.dtype), donate_argnums=0)
    kv = runner.state.kv
    runner.state = runner.state.__class__(kv=KVCache(k=fill(kv.k, jax.random.key(1)), v=fill(kv.v, jax.random.key(2))),
                                          output_counts=runner.state.output_counts, prompt_mask=runner.state.prompt_mask)
    del kv
    rows = []
    per_token_kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    for batch in batches:
        for context in contexts:
            inp = decode_input(batch, context, runner, FLAGS.steps)
            start = time.perf_counter()
            jax.block_until_ready(runner._run_decode(inp))
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(5):
                start = time.perf_counter()
                out = runner._run_decode(inp)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - start)
            ms_step = statistics.median(times) / FLAGS.steps * 1e3
            kv_bytes = batch * (context + FLAGS.steps / 2) * per_token_kv
            roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
            label = backend + (" scan" if scan_layers else "")
            rows.append((label, batch, context, batch / ms_step * 1e3, ms_step, roofline_ms / ms_step, compile_s))
            print(f"{label:11s} batch {batch:4d} ctx {context:5d}: {batch / ms_step * 1e3:9.1f} tok/s "
                  f"{ms_step:7.2f} ms/step  roofline {roofline_ms:6.2f} ms ({roofline_ms / ms_step:.2f})  "
                  f"first call {compile_s:.1f} s", flush=True)
    del runner, model
    return rows


def main(argv):
    del argv
    config = ModelConfig.from_preset(FLAGS.model)
    batches = [int(b) for b in FLAGS.batch]
    contexts = [int(c) for c in FLAGS.context]
    device = jax.devices()[0]
    bandwidth = copy_bandwidth()
    weight_bytes = config.num_parameters() * 2
    print(f"{device.device_kind}; jax {jax.__version__}; {FLAGS.model}: {config.num_parameters() / 1e9:.2f} B params; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.1f} GB -> batch-1 floor "
          f"{weight_bytes / bandwidth * 1e3:.2f} ms/step", flush=True)
    rows = []
    for scan in FLAGS.scan_layers:
        for backend in FLAGS.backends:
            rows += run_backend(config, backend, scan.lower() in ("true", "1"), batches, contexts, bandwidth,
                                weight_bytes)
    print("\n| backend (layers unrolled unless 'scan') | batch | context | tok/s | ms/step | fraction of roofline | first call (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f} |")


if __name__ == "__main__":
    app.run(main)
