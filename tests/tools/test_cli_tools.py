"""The ``autoglm analyze`` / ``autoglm autotune`` commands end to end on the tiny Llama (CPU)."""

import json
import subprocess
import sys

import pytest

from autoglm_jax.tools.serving_benchmark import Workload, run_isolated

ENV = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": "."}


def autoglm(*args, timeout=300):
    import os

    return subprocess.run([sys.executable, "-m", "autoglm_jax.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV})


def test_analyze_writes_json_and_tables(tmp_path):
    out = autoglm("analyze", "--model", "tiny-llama", "--max_batch_size", "2", "--max_num_batched_tokens", "16",
                  "--max_sequence_length", "32", "--nofusions", "--peak_tflops", "100", "--memory_bandwidth_gbs",
                  "1000", "--kv_cache_dtype", "fp8", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["prefill", "decode"]
    assert report["steps"][0]["roofline"]["bound"] in ("memory", "compute")
    assert "prefill T=16 B=2" in out.stdout and "roofline on given" in out.stdout
    # the fp8 cache's K/V bytes count in the roofline (1 byte an element against the float32 model's 4)
    assert report["kv_cache_dtype"] == "float8_e4m3fn" and "KV cache float8_e4m3fn" in out.stdout


def test_autotune_runs_the_serving_benchmark_and_writes_the_best_config(tmp_path):
    space = {"parameters": {"prefill_ratio": {"values": [0.5, 1.0]}},
             "fixed": {"model": "tiny-llama", "max_batch_size": 2, "max_num_batched_tokens": 16,
                       "max_sequence_length": 32, "decode_steps_per_call": 2, "max_logprobs": 1,
                       "compilation_cache_dir": str(tmp_path / "xla")},
             "objective": {"metric": "output_tokens_per_s", "constraints": [{"metric": "ttft_p90_ms", "max": 60000}]},
             "benchmark": {"num_requests": 4, "input_len": 8, "output_len": 4}}
    (tmp_path / "space.json").write_text(json.dumps(space))
    out = autoglm("autotune", "--space", str(tmp_path / "space.json"), "--strategy", "grid", "--max_trials", "5",
                  "--noisolate_trials", "--output_dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best["prefill_ratio"] in (0.5, 1.0) and best["model"] == "tiny-llama"
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok,True," in row for row in rows[1:])
    from autoglm_jax.engine.config import EngineConfig

    EngineConfig.from_dict(best)  # the file is a valid engine configuration


def test_isolated_trial_reports_a_bad_configuration():
    with pytest.raises(RuntimeError, match="prefill_ratio=2.0"):
        run_isolated({"model": "tiny-llama", "prefill_ratio": 2.0}, Workload(num_requests=1), timeout_s=120)
