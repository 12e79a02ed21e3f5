"""``python -m autoglm_jax.cli.autotune`` with a baseline (the engine defaults) on the tiny Llama (CPU),
and the GPU search space file (benchmarks/autotune_gpu_space.json) checked without running it."""

import dataclasses
import json
import os
import subprocess
import sys

from autoglm_jax.cli.autotune import baseline_params
from autoglm_jax.engine.buckets import BucketLadder
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.tools.objective import Objective
from autoglm_jax.tools.search_space import SearchSpace, read_spec_file
from autoglm_jax.tools.serving_benchmark import Workload

GPU_SPACE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "autotune_gpu_space.json")


def test_gpu_space_file_is_valid_and_contains_the_defaults():
    spec = read_spec_file(GPU_SPACE)
    space = SearchSpace.from_dict(spec)
    space.check_names({f.name for f in dataclasses.fields(EngineConfig)})
    baseline = baseline_params(spec["baseline"], space, EngineConfig())
    assert space.contains(baseline)  # so the Bayesian strategy learns from the default trial too
    assert Objective.from_dict(spec["objective"]).needs_baseline  # "no worse p90 TTFT than the defaults"
    workload = Workload(**spec["benchmark"])
    for point in space.grid():  # every trial is a valid engine configuration, with a short bucket ladder
        config = EngineConfig.from_dict({**space.fixed, **point})
        assert workload.input_len + workload.output_len <= config.max_sequence_length
        pages_per_sequence = -(-config.max_sequence_length // config.page_size)
        assert config.num_pages > min(workload.num_requests, config.max_batch_size) * pages_per_sequence
        ladder = BucketLadder(config.max_batch_size, max(config.max_num_batched_tokens, config.max_batch_size))
        assert len(ladder.decode_batches) + len(ladder.token_buckets) <= 17, point


def autotune_cli(*args):
    return subprocess.run([sys.executable, "-m", "autoglm_jax.cli.autotune", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": "."})


def test_autotune_cli_refuses_unknown_keys(tmp_path):
    (tmp_path / "space.json").write_text(json.dumps({"parameters": {"max_batch_size": {"values": [2]}},
                                                     "benchmarks": {"num_requests": 4}}))
    out = autotune_cli("--space", str(tmp_path / "space.json"), "--output_dir", str(tmp_path / "out"))
    assert out.returncode != 0 and "unknown keys ['benchmarks']" in out.stderr


def test_autotune_cli_runs_the_defaults_first_and_writes_the_summary(tmp_path):
    space = {"parameters": {"prefill_ratio": {"values": [0.5, 0.8]}, "batching_window_max_ms": {"values": [5.0, 10.0]}},
             "fixed": {"model": "smollm2-135m-instruct", "max_batch_size": 2, "max_num_batched_tokens": 16,
                       "max_sequence_length": 32, "decode_steps_per_call": 2, "max_logprobs": 1,
                       "compilation_cache_dir": str(tmp_path / "xla")},
             "baseline": "defaults",
             "objective": {"metric": "output_tokens_per_s",
                           "constraints": [{"metric": "ttft_p90_ms", "max_vs_baseline": 100.0}]},
             "benchmark": {"num_requests": 256, "input_len": 8, "output_len": 4}}
    (tmp_path / "space.json").write_text(json.dumps(space))
    out_dir = tmp_path / "out"
    out = autotune_cli("--space", str(tmp_path / "space.json"), "--strategy", "grid", "--max_trials", "2",
                       "--noisolate_trials", "--time_budget_s", "600", "--output_dir", str(out_dir),
                       "--model", "tiny-llama", "--num_requests", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = (out_dir / "summary.md").read_text()
    assert summary in out.stdout  # printed for pasting into RESULTS.md, and written
    lines = summary.splitlines()
    assert lines[0].startswith("Autotune: maximize output_tokens_per_s subject to ttft_p90_ms <= ")
    assert lines[1] == "Device: cpu (cpu), jax " + __import__("jax").__version__ + "."
    assert "'num_requests': 4," in lines[2] and "'model': 'tiny-llama'" in lines[3]
    assert lines[4].endswith("bounds as given: maximize output_tokens_per_s subject to ttft_p90_ms <= 100 x the "
                             "baseline's.") and "{'prefill_ratio': 0.8, 'batching_window_max_ms': 5.0}" in lines[4]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[1].strip("*| ").startswith("0 (default)") and "| 0.8 | 5.0 |" in rows[1].replace("*", "")
    assert len(rows) == 3 and rows[2].replace("*", "").startswith("| 1 | 0.5 | 5.0 |")
    assert lines[-1].startswith(("Best (trial 1) beats the default (trial 0): output_tokens_per_s ",
                                 "No trial beat the default (trial 0)"))
    best = json.loads((out_dir / "best_config.json").read_text())
    assert best["model"] == "tiny-llama" and best["max_batch_size"] == 2
    EngineConfig.from_dict(best)
    assert len((out_dir / "results.csv").read_text().splitlines()) == 3
    assert len((out_dir / "trials.jsonl").read_text().splitlines()) == 3  # header + 2 trials
