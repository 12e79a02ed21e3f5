"""benchmarks/decode.py --engine end to end on the tiny GLM-4 (CPU), in the regime that used to hang: more
prefill calls than the requests' spare tokens, so the first requests decode through the whole prefill."""

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": "."}


def test_engine_decode_with_long_chunked_prefill_finishes():
    # 32 x 600 prompt tokens at 512 per call = 38 mixed calls, each decoding one token for every running
    # request, against 8 timed + (1 + 4) x 2 profile + 16 spare tokens: sized only for the latter, the first
    # requests ran out of max_tokens before the timed decode, which then waited forever for tokens.
    out = subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--engine", "--model=tiny-glm4", "--dtype=float32", "--batch=32",
         "--context=600", "--engine_tokens=8", "--steps=2", "--profile_steps=1"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = re.findall(r"^\| 32 \| 600 \| (off|on) \| ([\d.]+) \| ([\d.]+) \|.*\| ([\d.]+) \| (-?[\d.]+)% \|$",
                      out.stdout, re.M)
    assert [r[0] for r in rows] == ["off", "on"], out.stdout[-2000:]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert out.stdout.count("step log: ") == 2  # the timed phase's engine step log, per mode
