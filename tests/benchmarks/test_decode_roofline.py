"""benchmarks/decode.py's roofline counts the bytes a decode step reads (an untied input-embedding table is
gathered, not streamed; a tied one is the lm_head and is) and a step's GEMM FLOPs (the lm_head for the sampled
rows only)."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

PROBE = """
import json, sys
sys.path[:0] = ["benchmarks", "."]
import decode
from autoglm_jax.config import ModelConfig
out = {}
for name in ("glm-4-9b-0414", "smollm2-135m-instruct"):
    c = ModelConfig.from_preset(name)
    out[name] = dict(params=c.num_parameters(), embed=c.vocab_size * c.hidden_size, tied=c.tie_word_embeddings,
                     streamed=decode.streamed_parameters(c), flops=decode.step_matmul_flops(c, 2048, 256))
print(json.dumps(out))
"""


def test_streamed_bytes_and_step_flops():
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    glm, smol = out["glm-4-9b-0414"], out["smollm2-135m-instruct"]
    assert not glm["tied"] and glm["streamed"] == glm["params"] - glm["embed"]
    assert 17.5e9 < 2 * glm["streamed"] < 17.6e9  # GLM-4-9B reads 17.56 GB a step, not its 18.8 GB of weights
    assert smol["tied"] and smol["streamed"] == smol["params"]  # the tied table is the lm_head: read every step
    layers = glm["streamed"] - glm["embed"]  # decoder layers (+ final norm), without the lm_head
    assert glm["flops"] == 2.0 * 2048 * layers + 2.0 * 256 * glm["embed"]
