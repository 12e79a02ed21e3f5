"""Serving benchmark through ``AutoGLMEngine``: offline throughput or Poisson-rate online load.

Prints output tok/s, requests/s and TTFT / TPOT / ITL / end-to-end p50, p90, p99 (ms); --json writes
the metrics (the same dict ``autoglm autotune`` optimises). Engine settings come from --config (a
JSON file of EngineConfig fields, e.g. the autotuner's best_config.json) and the flags below.

    .venv/bin/python benchmarks/serving.py --model tiny-llama --num_requests 16 --input_len 32 --output_len 16
    .venv/bin/python benchmarks/serving.py --model glm-4-9b-chat-hf --request_rate 8 --num_requests 200
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Preset, HF directory, .gguf or Orbax checkpoint (default: embedded SmolLM2).")
flags.DEFINE_string("config", None, "JSON file of EngineConfig settings (flags given explicitly override it).")
flags.DEFINE_integer("max_batch_size", 32, "Sequences decoding together.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget of one engine step.")
flags.DEFINE_integer("max_sequence_length", 1024, "Prompt + output tokens of one sequence.")
flags.DEFINE_integer("num_requests", 64, "Requests in the workload.")
flags.DEFINE_integer("input_len", 128, "Prompt tokens per request (random ids).")
flags.DEFINE_integer("output_len", 64, "Output tokens per request (EOS ignored).")
flags.DEFINE_float("request_rate", None, "Poisson arrival rate in requests/s (default: offline, all at once).")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("json", None, "Write the metrics as JSON to this file.")
flags.DEFINE_bool("batching_modes", False, "Run the workload under static batching, continuous (dynamic) "
                  "batching and continuous batching with the adaptive window, and print one table.")

# The seed's three rows: (name, EngineConfig overrides).
BATCHING_MODES = (
    ("static batching", {"use_dynamic_batching": False}),
    ("dynamic batching", {"use_dynamic_batching": True, "adaptive_batching": False}),
    ("adaptive batching", {"use_dynamic_batching": True, "adaptive_batching": True}),
)

_ENGINE_FLAGS = ("model", "max_batch_size", "max_num_batched_tokens", "max_sequence_length")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from autoglm_jax.cli.engine_settings import settings_from_flags
    from autoglm_jax.tools.serving_benchmark import Workload, benchmark_settings

    settings = settings_from_flags(FLAGS, _ENGINE_FLAGS, FLAGS.config)
    workload = Workload(FLAGS.num_requests, FLAGS.input_len, FLAGS.output_len, FLAGS.request_rate, FLAGS.seed)
    if FLAGS.batching_modes:
        compare_batching_modes(settings, workload)
        return
    metrics = benchmark_settings(settings, workload)
    metrics.update(device=jax.devices()[0].device_kind, jax_version=jax.__version__, settings=settings,
                   workload=dataclasses.asdict(workload))
    print(f"{metrics['output_tokens_per_s']:.1f} output tok/s, {metrics['requests_per_s']:.2f} req/s over "
          f"{metrics['duration_s']:.2f} s on {metrics['device']}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        print(f"  {name:<5} p50 {metrics[f'{name}_p50_ms']:9.2f} ms  p90 {metrics[f'{name}_p90_ms']:9.2f} ms  "
              f"p99 {metrics[f'{name}_p99_ms']:9.2f} ms")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(metrics, f, indent=1)


def compare_batching_modes(settings: dict, workload) -> None:
    from autoglm_jax.tools.serving_benchmark import benchmark_settings

    rate = f"{workload.request_rate} req/s Poisson" if workload.request_rate else "offline"
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {workload.num_requests} requests, "
          f"{workload.input_len} in / {workload.output_len} out, {rate}; settings {settings}")
    print("\n| mode | output tok/s | req/s | mean latency (ms) | e2e p90 (ms) | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in BATCHING_MODES:
        m = benchmark_settings({**settings, **overrides}, workload)
        print(f"| {name} | {m['output_tokens_per_s']:.1f} | {m['requests_per_s']:.2f} | {m['e2e_mean_ms']:.0f} | "
              f"{m['e2e_p90_ms']:.0f} | {m['ttft_p50_ms']:.0f} | {m['ttft_p90_ms']:.0f} | {m['tpot_p50_ms']:.1f} |",
              flush=True)


if __name__ == "__main__":
    app.run(main)
