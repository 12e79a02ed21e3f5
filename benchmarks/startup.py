"""Engine start-up time: cold (empty persistent compilation cache) and warm (the cache the cold run filled).

Each start is a fresh Python process that builds ``EngineCore`` with warmup on (every bucket of the ladder
compiled, as ``autoglm serve`` does) and prints the time to the first servable state, split into model
build (random weights on the device for a preset) and warmup compilation. Issue 5's targets: cold <= 60 s,
warm <= 10 s.

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/startup.py --model=glm-4-9b-0414
    PYTHONPATH=. .venv/bin/python benchmarks/startup.py --model=tiny-llama     # CPU smoke run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-0414", "Preset (random weights) or checkpoint path.")
flags.DEFINE_integer("max_batch_size", 64, "Engine max_batch_size (sets the decode buckets).")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Engine token budget (sets the mixed-step buckets).")
flags.DEFINE_integer("max_sequence_length", 2048, "Engine max_sequence_length.")
flags.DEFINE_integer("num_pages", 4097, "KV pages (fixed, so the start does not depend on free memory).")
flags.DEFINE_string("settings", "{}", "Extra EngineConfig settings as JSON, e.g. '{\"scan_layers\": true}'.")
flags.DEFINE_string("child", None, "Internal: run one start with this compilation cache dir and print JSON.")


def one_start(cache_dir: str) -> dict:
    start = time.perf_counter()
    import jax

    from autoglm_jax.engine.core import EngineCore

    settings = dict(model=FLAGS.model, skip_tokenizer_init=True, show_progress=False, compilation_cache_dir=cache_dir,
                    max_batch_size=FLAGS.max_batch_size, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                    max_sequence_length=FLAGS.max_sequence_length, num_pages=FLAGS.num_pages,
                    **json.loads(FLAGS.settings))
    core = EngineCore(settings)
    total = time.perf_counter() - start
    return {"total_s": total, "warmup_s": core.warmup_seconds, "build_s": total - core.warmup_seconds,
            "programs": core.runner.num_traces, "device": jax.devices()[0].device_kind}


def main(argv):
    del argv
    if FLAGS.child:
        print("RESULT " + json.dumps(one_start(FLAGS.child)), flush=True)
        return
    with tempfile.TemporaryDirectory() as cache:
        rows = []
        for label in ("cold", "warm"):
            cmd = [sys.executable, os.path.abspath(__file__), f"--child={cache}", f"--model={FLAGS.model}",
                   f"--max_batch_size={FLAGS.max_batch_size}", f"--max_num_batched_tokens={FLAGS.max_num_batched_tokens}",
                   f"--max_sequence_length={FLAGS.max_sequence_length}", f"--num_pages={FLAGS.num_pages}",
                   f"--settings={FLAGS.settings}"]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"{label} start failed ({out.returncode}):\n{out.stderr[-3000:]}")
            rows.append((label, json.loads(lines[-1][len("RESULT "):])))
    print(f"\n{FLAGS.model}, settings {FLAGS.settings}, device {rows[0][1]['device']}")
    print("| start | total (s) | model build (s) | warmup compile (s) | programs |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['total_s']:.1f} | {r['build_s']:.1f} | {r['warmup_s']:.1f} | {r['programs']} |")


if __name__ == "__main__":
    app.run(main)
