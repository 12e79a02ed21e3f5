"""Engine start-up time: cold (empty persistent compilation cache) and warm (the cache the cold run filled).

Each start is a fresh Python process that builds ``EngineCore`` with warmup on (every bucket of the ladder
compiled, as ``autoglm serve`` does) and prints the time to the first servable state. On one device the
step programs compile from the weights' abstract values while the weights are built / loaded, so the
start takes about max(weights, compile) + first runs; the columns: ``weights`` (model build: random
weights on the device for a preset, else loading), ``compile`` (all step programs traced + compiled or
loaded, in the background from the start of the weights), ``after weights`` (warmup's wait for the
compile once the weights were there, plus one run of each program), the serial trace+lower seconds of
the traced programs and the slowest single compile. Issue 5's targets: cold <= 60 s, warm <= 10 s.

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/startup.py --model=glm-4-9b-0414
    PYTHONPATH=. .venv/bin/python benchmarks/startup.py --tiny     # CPU smoke run (tiny-glm4, small pool)
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
flags.DEFINE_bool("tiny", False, "CPU smoke run: tiny-glm4 with unrolled layers and the executable cache on (as on "
                  "GPU), a 257-page pool and 256-token sequences; the ladder flags keep their values.")
flags.DEFINE_integer("decode_tokens", 0, "After each start, greedy batch-1 decode of this many tokens, reported "
                     "in tokens/s (checks the programs compiled alongside the weights run as fast; 0 = off).")
flags.DEFINE_string("export_autotune_seed", None, "Three starts: cold with no XLA autotuning seed (its autotune "
                    "results added to this seed: a .tar.gz, e.g. autoglm_jax/engine/autotune_seeds/<card>.tar.gz, or a directory), cold seeded "
                    "from that seed in a fresh cache, then warm.")
flags.DEFINE_string("child", None, "Internal: run one start with this compilation cache dir and print JSON.")

TINY = dict(model="tiny-glm4", max_sequence_length=256, num_pages=257,
            settings='{"scan_layers": false, "executable_cache": true}')


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
    timings = core.runner.compile_timings
    decode = decode_tokens_per_second(core, FLAGS.decode_tokens) if FLAGS.decode_tokens else None
    return {"total_s": total, "weights_s": core.weights_seconds, "compile_s": core.runner.compile_seconds,
            "decode_tok_s": decode, "after_weights_s": core.warmup_seconds, "traced": len(timings),
            "loaded": core.runner.num_loaded_executables, "lower_s": sum(t.lower_s for t in timings),
            "max_compile_s": max((t.compile_s for t in timings), default=0.0),
            "per_program": [[t.key[0], t.key[1][0], round(t.lower_s, 2), round(t.compile_s, 2)] for t in timings],
            "device": jax.devices()[0].device_kind}


def decode_tokens_per_second(core, tokens: int) -> float:
    """Batch-1 greedy decode speed: (time for 1 + tokens outputs - time for 1 output) / tokens."""
    from autoglm_jax import LLM, SamplingParams

    llm, prompt = LLM.from_engine(core), [{"prompt_token_ids": list(range(100, 164))}]

    def seconds(max_tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    seconds(1 + tokens)  # any first-call cost
    return tokens / (seconds(1 + tokens) - seconds(1))


def main(argv):
    del argv
    if FLAGS.tiny:
        for name, value in TINY.items():
            setattr(FLAGS, name, value)
    if FLAGS.child:
        print("RESULT " + json.dumps(one_start(FLAGS.child)), flush=True)
        return
    base = json.loads(FLAGS.settings)
    if FLAGS.export_autotune_seed:  # (label, cache, seed setting, export the cache's autotune results after)
        starts = [("cold, no seed", "a", None, True), ("cold, seeded", "b", FLAGS.export_autotune_seed, False),
                  ("warm", "b", FLAGS.export_autotune_seed, False)]
    else:
        seed = base.get("xla_autotune_seed", "auto")
        starts = [("cold", "a", seed, False), ("warm", "a", seed, False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, cache_name, seed, export in starts:
            cache = os.path.join(tmp, cache_name)
            settings = json.dumps({**base, "xla_autotune_seed": seed})
            cmd = [sys.executable, os.path.abspath(__file__), f"--child={cache}", f"--model={FLAGS.model}",
                   f"--max_batch_size={FLAGS.max_batch_size}", f"--max_num_batched_tokens={FLAGS.max_num_batched_tokens}",
                   f"--max_sequence_length={FLAGS.max_sequence_length}", f"--num_pages={FLAGS.num_pages}",
                   f"--settings={settings}", f"--decode_tokens={FLAGS.decode_tokens}"]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"{label} start failed ({out.returncode}):\n{out.stderr[-3000:]}")
            rows.append((label, json.loads(lines[-1][len("RESULT "):])))
            if export:
                from autoglm_jax.engine.autotune_seed import export_autotune_seed

                count = export_autotune_seed(cache, FLAGS.export_autotune_seed)
                print(f"exported {count} XLA autotuning results to {FLAGS.export_autotune_seed}", flush=True)
    print(f"\n{FLAGS.model}, settings {FLAGS.settings}, device {rows[0][1]['device']}")
    print("| start | total (s) | weights (s) | compile, overlapped (s) | after weights (s) | traced / loaded "
          "| trace+lower, serial (s) | slowest compile (s) | batch-1 decode (tok/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['total_s']:.1f} | {r['weights_s']:.1f} | {r['compile_s']:.1f} | "
              f"{r['after_weights_s']:.1f} | {r['traced']} / {r['loaded']} | {r['lower_s']:.1f} | "
              f"{r['max_compile_s']:.1f} | {r['decode_tok_s'] or 0:.1f} |")
    print("cold, per program [kind, bucket, trace+lower s, compile s]:", json.dumps(rows[0][1]["per_program"]))


if __name__ == "__main__":
    app.run(main)
