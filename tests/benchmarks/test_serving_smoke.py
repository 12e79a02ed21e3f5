"""benchmarks/serving.py and benchmarks/hf_serving.py end to end on tiny random presets (CPU), merged by --merge."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": "."}
WORKLOAD = ["--num_requests=3", "--input_len=8", "--output_len=4", "--workloads=fixed,mixed", "--range_ratio=0.5"]


def script(name, *args):
    out = subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_serving_sweep_transformers_baseline_and_merge(tmp_path):
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"model": "tiny-llama", "max_batch_size": 2, "max_num_batched_tokens": 16,
                                  "decode_steps_per_call": 2, "compilation_cache_dir": str(tmp_path / "xla")}))
    ours, theirs = tmp_path / "serving.json", tmp_path / "hf.json"
    stdout = script("serving.py", f"--config={config}", "--batching_modes", "--request_rates=inf,50",
                    "--online_num_requests=2", f"--json={ours}", *WORKLOAD)
    rows = json.loads(ours.read_text())["runs"][0]["rows"]
    assert [(r["mode"], r["workload"], r["request_rate"], r["num_requests"]) for r in rows[:4]] == [
        ("static batching", "fixed 8/4", None, 3), ("static batching", "fixed 8/4", 50.0, 2),
        ("static batching", "mixed 8/4 ±50%", None, 3), ("static batching", "mixed 8/4 ±50%", 50.0, 2)]
    assert [r["mode"] for r in rows[4::4]] == ["dynamic batching", "adaptive batching"] and len(rows) == 12
    assert all(r["output_tokens"] == 4 * r["num_requests"] for r in rows if r["workload"] == "fixed 8/4")
    assert all(r["gpu_util_source"] == "n/a" and r["settings"]["max_sequence_length"] == 256 for r in rows)
    assert stdout.count("| autoglm-jax |") == 12

    stdout = script("hf_serving.py", "--model=tiny-llama", "--num_blocks=4", "--max_batch_tokens=32",
                    f"--json={theirs}", *WORKLOAD)
    hf_rows = json.loads(theirs.read_text())["runs"][0]["rows"]
    assert [(r["workload"], r["num_requests"], r["output_tokens"]) for r in hf_rows] == [
        ("fixed 8/4", 3, 12), ("mixed 8/4 ±50%", 3, rows[2]["output_tokens"])]
    assert hf_rows[0]["engine"] == "transformers" and hf_rows[0]["ttft_p50_ms"] > 0

    stdout = script("serving.py", f"--merge={ours},{theirs}", f"--plot={tmp_path / 'plot.png'}")
    assert stdout.count("| transformers |") == 2 and stdout.count("x transformers continuous batching") == 6
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_past_the_deadline_nothing_runs_and_the_skipped_runs_are_listed(tmp_path):
    stdout = script("serving.py", "--model=tiny-llama", "--batching_modes", "--request_rates=inf,2", "--deadline_s=0",
                    f"--json={tmp_path / 'r.json'}")
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["rows"] == [] and len(run["meta"]["skipped"]) == 6
    assert "skipped (--deadline_s=0.0): adaptive batching / fixed 128/64 / offline;" in stdout


def test_serving_traces_a_window_of_the_offline_run(tmp_path):
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"model": "tiny-llama", "max_batch_size": 2, "max_num_batched_tokens": 16,
                                  "compilation_cache_dir": str(tmp_path / "xla")}))
    stdout = script("serving.py", f"--config={config}", "--num_requests=4", "--input_len=8",
                    "--output_len=16", "--profile_at_s=0", "--profile_s=0.3")
    profile = stdout[stdout.index("[profile] 0.3 s from 0 s into the run:"):]
    assert "device span" in profile and "busy" in profile, profile  # the CPU client's plane stands in
