"""Tensor parallelism (TP=2/4/8, with stacked or unrolled layer weights, with a float or an fp8 KV cache),
data-parallel replicas (DP=2, TP=2 x DP=2) and a two-process
multi-host run give the same greedy tokens as one device, for tiny GLM-4 and Llama checkpoints
with 8 query heads / 2 KV heads (so TP=4 and TP=8 replicate KV heads) and vocab split over TP.

JAX needs XLA_FLAGS=--xla_force_host_platform_device_count before it starts, so every run is a
subprocess (``tests/parallel/worker.py``); all of them start together and the tests read their JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autoglm_jax.parallel.distributed import free_port
from tests.hf_tiny import save_tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADS = dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
# "u": layers unrolled over per-layer weight buffers (scan_layers=False, the GPU default); "f": an fp8 KV cache
# (kv_cache_dtype="fp8", compared with one device's fp8 run "1x1f"; TP=4 replicates the 2 KV heads' pages)
LOCAL_RUNS = {"glm4": ("Glm4ForCausalLM", ["1x1", "2x1", "4x1", "8x1", "1x2", "2x2", "1x1u", "4x1u", "1x1f", "4x1uf"]),
              "llama": ("LlamaForCausalLM", ["1x1", "2x1", "8x1", "2x1u"])}
TIMEOUT_S = 900


def _start(args: list[str], log_path: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("XLA_FLAGS", None)
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "tests.parallel.worker", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    jobs = {}
    for name, (arch, specs) in LOCAL_RUNS.items():
        save_tiny(arch, root / name, seed=3, **HEADS)
        jobs[name] = _start(["local", str(root / name), str(root / f"{name}.json"), *specs], root / f"{name}.log")
    port = str(free_port())
    for rank in (0, 1):
        jobs[f"host{rank}"] = _start(["multihost", str(root / "glm4"), str(root / f"host{rank}.json"), port, str(rank), "2"],
                                     root / f"host{rank}.log")
    out = {}
    for name, job in jobs.items():
        try:
            code = job.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            job.kill()
            code = "timeout"
        log = (root / f"{name}.log").read_text()[-3000:]
        assert code == 0, f"worker {name} failed ({code}):\n{log}"
        out[name] = json.loads((root / f"{name}.json").read_text())
    return out


@pytest.mark.parametrize("model, spec", [(m, s) for m, (_, specs) in LOCAL_RUNS.items() for s in specs[1:]
                                         if s != "1x1f"])
def test_parallel_greedy_tokens_equal_one_device(results, model, spec):
    one_device = results[model]["1x1f" if spec.endswith("f") else "1x1"]
    assert [len(t) for t in one_device] == [12, 6, 17, 9, 14]
    assert len({tuple(t) for t in one_device}) == len(one_device)  # the prompts give different outputs
    assert results[model][spec] == one_device, f"{model} tp x dp = {spec} differs from one device"


def test_two_process_multi_host_run_equals_one_process(results):
    assert results["host0"]["devices"] == 4  # 2 processes x 2 CPU devices, one TP=4 mesh
    assert results["host1"]["follower_steps"] > 0  # process 1 ran process 0's broadcast plans
    assert results["host0"]["multihost"] == results["glm4"]["1x1"]
