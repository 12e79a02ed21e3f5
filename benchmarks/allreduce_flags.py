"""Which XLA collective settings make a decode step's small all-reduces fastest, then TP decode with the best.

Each variant of XLA_FLAGS runs ``multi_gpu.py --allreduce_only`` in a fresh process (XLA reads the flags
once): the time of one step's 2L+1 all-reduces of [batch, H] per TP size. Then ``multi_gpu.py`` measures
TP decode (engine, scheduler, unrolled layers) under the default flags and under the fastest variant, so
the gain shows end to end on the same machine. NCCL's NVLink multicast (NVLS) stays off (machine policy).

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/allreduce_flags.py --tp=1,2,4 --batch=1,64
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("tp", ["1", "2", "4"], "TP sizes (1 = the baseline of the decode run).")
flags.DEFINE_list("batch", ["1", "64"], "Decode batch sizes.")
flags.DEFINE_list("variants", [
    "",
    "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true",
    "--xla_gpu_experimental_use_collective_kernels=true",
    "--xla_gpu_enable_command_buffer=+COLLECTIVES",
], "XLA_FLAGS values to compare ('' = defaults).")
flags.DEFINE_list("decode_batch", ["1"], "Batch sizes of the TP decode runs.")
flags.DEFINE_bool("decode", True, "Then run TP decode under the defaults and the fastest variant.")
flags.DEFINE_integer("timeout_s", 240, "Per-process limit.")

HERE = os.path.dirname(os.path.abspath(__file__))


def run(xla_flags: str, args: list[str]) -> str:
    env = {**os.environ, "XLA_FLAGS": xla_flags}
    cmd = [sys.executable, os.path.join(HERE, "multi_gpu.py"), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=FLAGS.timeout_s)
    except subprocess.TimeoutExpired:
        return "TIMEOUT"
    if out.returncode != 0:
        return "FAILED: " + out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else "FAILED"
    return out.stdout


def main(argv):
    del argv
    tp_args = [f"--tp={','.join(FLAGS.tp)}", f"--batch={','.join(FLAGS.batch)}", "--dp="]
    totals = {}
    print("| XLA_FLAGS | " + " | ".join(f"tp={t} b={b} (ms/step)" for t in FLAGS.tp if t != "1" for b in FLAGS.batch) + " |")
    print("|---|" + "---|" * sum(1 for t in FLAGS.tp if t != "1" for _ in FLAGS.batch))
    for variant in FLAGS.variants:
        out = run(variant, ["--allreduce_only", *tp_args])
        found = {(int(t), int(b)): float(ms) for t, b, ms in
                 re.findall(r"ALLREDUCE tp=(\d+) batch=(\d+) ms_per_step=([\d.]+)", out)}
        cells = [f"{found[(int(t), int(b))]:.3f}" if (int(t), int(b)) in found else out.splitlines()[-1][:60]
                 for t in FLAGS.tp if t != "1" for b in FLAGS.batch]
        print(f"| `{variant or '(defaults)'}` | " + " | ".join(cells) + " |", flush=True)
        if found and len(found) == len(cells):
            totals[variant] = sum(found.values())
    if not FLAGS.decode or not totals:
        return
    best = min(totals, key=totals.get)
    for variant in dict.fromkeys(["", best]):
        print(f"\n== TP decode with XLA_FLAGS='{variant}'", flush=True)
        out = run(variant, [f"--tp={','.join(FLAGS.tp)}", f"--batch={','.join(FLAGS.decode_batch)}", "--dp=",
                            "--context=256", "--decode_tokens=32", "--profile=false"])
        print("\n".join(line for line in out.splitlines() if not re.match(r"^[IW]\d{4}", line)), flush=True)


if __name__ == "__main__":
    app.run(main)
