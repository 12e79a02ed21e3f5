"""``autoglm analyze``: operator analysis of the compiled prefill and decode steps before deployment.

Owns: the flags of this command. The absl ``main`` only builds the configs and calls
``autoglm_jax.tools.analysis``; it reads no weights (shapes only), so a 9B preset analyses anywhere.

    autoglm analyze --model glm-4-9b-chat-hf --max_batch_size 32 --max_num_batched_tokens 512
    autoglm analyze --model tiny-llama --json report.json
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from autoglm_jax.engine.config import EngineConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Preset name, Hugging Face directory, .gguf file or Orbax checkpoint "
                    "(default: the embedded SmolLM2-135M-Instruct).")
flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"], "Weights/compute dtype.")
flags.DEFINE_integer("max_batch_size", 32, "Sequences decoding together.")
flags.DEFINE_integer("max_sequence_length", 2048, "Prompt + output tokens of one sequence.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget of one engine step.")
flags.DEFINE_integer("page_size", EngineConfig.page_size, "Tokens per KV page.")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"],
                  "KV cache dtype: auto (the model's) or fp8 (e4m3; half the pool bytes and the roofline's K/V bytes).")
flags.DEFINE_integer("num_pages", None, "KV pool size in pages (default: planned as the engine does).")
flags.DEFINE_integer("decode_steps_per_call", 8, "Decode steps per jitted call.")
flags.DEFINE_integer("max_logprobs", 20, "Most top logprobs (compiled into the step's outputs).")
flags.DEFINE_enum("attention_backend", "auto", ["auto", "xla", "pallas"], "Attention implementation.")
flags.DEFINE_integer("prefill_tokens", None, "Token bucket of the prefill step to analyse (default: largest).")
flags.DEFINE_integer("decode_batch", None, "Batch bucket of the decode step to analyse (default: largest).")
flags.DEFINE_float("peak_tflops", None, "Peak matmul TFLOP/s for the roofline (default: the device table).")
flags.DEFINE_float("memory_bandwidth_gbs", None, "Memory bandwidth in GB/s for the roofline.")
flags.DEFINE_bool("fusions", True, "Also build the fusion before/after table (compiles 10 more programs).")
flags.DEFINE_string("json", None, "Write the report as JSON to this file ('-' = stdout instead of the tables).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.peak_tflops is None) != (FLAGS.memory_bandwidth_gbs is None):
        raise app.UsageError("--peak_tflops and --memory_bandwidth_gbs go together")
    import jax.numpy as jnp

    from autoglm_jax.engine.core import resolve_dtype
    from autoglm_jax.tools.analysis import analyze, format_report
    from autoglm_jax.tools.roofline import DeviceSpec
    from autoglm_jax.checkpoint.loader import model_config_of

    engine_config = EngineConfig(
        model=FLAGS.model, dtype=FLAGS.dtype, max_batch_size=FLAGS.max_batch_size,
        max_sequence_length=FLAGS.max_sequence_length, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
        page_size=FLAGS.page_size, kv_cache_dtype=FLAGS.kv_cache_dtype, num_pages=FLAGS.num_pages,
        decode_steps_per_call=FLAGS.decode_steps_per_call,
        max_logprobs=FLAGS.max_logprobs, attention_backend=FLAGS.attention_backend, compilation_cache_dir=None)
    spec = None
    if FLAGS.peak_tflops is not None:
        dtype = jnp.dtype(resolve_dtype(FLAGS.dtype)).name
        spec = DeviceSpec("given", {dtype: FLAGS.peak_tflops * 1e12}, FLAGS.memory_bandwidth_gbs * 1e9)
    report = analyze(model_config_of(FLAGS.model), engine_config, prefill_tokens=FLAGS.prefill_tokens,
                     decode_batch=FLAGS.decode_batch, spec=spec, fusions=FLAGS.fusions)
    if FLAGS.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
        return
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)
    print(format_report(report))


if __name__ == "__main__":
    app.run(main)
