"""The serving benchmark's arithmetic on the CPU, no engine: workload, metrics, GPU sampler fallbacks, report."""

import os
import sys
import time
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from _serving_gpu import UtilizationSampler, parse_utilization  # noqa: E402
from _serving_metrics import RequestTiming, timing_from_token_times  # noqa: E402
from _serving_report import markdown_table, parse_rates, plot, speedups  # noqa: E402
from _serving_workload import ServingWorkload, named_workloads  # noqa: E402

from autoglm_jax.tools.serving_benchmark import Timing, Workload, summarize  # noqa: E402


def test_summary_of_known_timings():
    # request 0: submitted 0, tokens at 1, 2, 4 -> TTFT 1, TPOT 1.5, gaps 1 and 2, e2e 4
    # request 1: submitted 1, one token at 3   -> TTFT 2, no TPOT/ITL,          e2e 2
    timings = [timing_from_token_times(0.0, [1.0, 2.0, 4.0]), timing_from_token_times(1.0, [3.0])]
    m = summarize(timings)
    assert m["duration_s"] == 4.0 and m["output_tokens"] == 4 and m["num_requests"] == 2
    assert m["output_tokens_per_s"] == 1.0 and m["requests_per_s"] == 0.5
    assert m["ttft_mean_ms"] == pytest.approx(1500) and m["ttft_p50_ms"] == pytest.approx(1500)
    assert m["ttft_p90_ms"] == pytest.approx(1900)  # linear interpolation between 1000 and 2000 ms
    assert m["tpot_p50_ms"] == pytest.approx(1500) and m["tpot_p99_ms"] == pytest.approx(1500)
    assert m["itl_p50_ms"] == pytest.approx(1500) and m["itl_p99_ms"] == pytest.approx(1990)
    assert m["e2e_mean_ms"] == pytest.approx(3000) and m["e2e_p90_ms"] == pytest.approx(3800)
    assert summarize(timings, start=-1.0)["duration_s"] == 5.0


def test_percentiles_of_many_requests_match_numpy():
    rng = np.random.default_rng(0)
    firsts = rng.uniform(0.01, 0.5, 200)
    timings = [RequestTiming(0.0, f, f + 1.0, 11, (0.1,) * 10) for f in firsts]
    m = summarize(timings)
    assert m["ttft_p99_ms"] == pytest.approx(np.percentile(firsts, 99) * 1e3)
    assert m["tpot_p90_ms"] == pytest.approx(100.0) and m["itl_p50_ms"] == pytest.approx(100.0)


def test_streamed_updates_spread_their_gap_over_their_tokens(monkeypatch):
    import autoglm_jax.tools.serving_benchmark as serving_benchmark

    class Output:  # what a RequestHandle yields: cumulative token ids
        def __init__(self, n):
            self.outputs = [types.SimpleNamespace(token_ids=list(range(n)))]

    clock = iter([10.0, 10.4, 11.2])
    monkeypatch.setattr(serving_benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    timing = Timing()
    timing.submitted = 9.5
    timing.consume([Output(1), Output(3), Output(7)])  # +1 token, +2 in 0.4 s, +4 in 0.8 s
    assert timing.gaps == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    m = summarize([timing])
    assert m["ttft_p50_ms"] == pytest.approx(500) and m["tpot_p50_ms"] == pytest.approx(1200 / 6)


def test_bad_timings_are_refused():
    with pytest.raises(ValueError, match="no output tokens"):
        timing_from_token_times(0.0, [])
    with pytest.raises(ValueError, match="non-decreasing"):
        timing_from_token_times(0.0, [2.0, 1.0])
    with pytest.raises(ValueError, match="no requests"):
        summarize([])


def test_fixed_workload_is_the_autotuners_and_mixed_lengths_spread_around_the_mean():
    fixed = ServingWorkload(8, 32, 16, seed=3)
    autotuner_prompts = [p["prompt_token_ids"] for p in Workload(8, 32, 16, seed=3).prompts(500)]
    assert [p for p, _ in fixed.requests(500)] == autotuner_prompts
    assert {n for _, n in fixed.requests(500)} == {16} and fixed.label == "fixed 32/16"
    mixed = ServingWorkload(400, 100, 50, seed=3, range_ratio=0.5)
    ins, outs = mixed.input_lens(), mixed.output_lens()
    assert ins.min() >= 50 and ins.max() <= 150 and abs(ins.mean() - 100) < 5
    assert outs.min() >= 25 and outs.max() <= 75 and not np.array_equal(ins[:50] // 2, outs[:50])
    assert mixed.max_total_len() == int((ins + outs).max()) and mixed.label == "mixed 100/50 ±50%"
    assert [len(p) for p, _ in mixed.requests(500)] == ins.tolist()
    assert mixed.requests(500) == ServingWorkload(400, 100, 50, seed=3, range_ratio=0.5).requests(500)
    with pytest.raises(ValueError, match="range_ratio"):
        ServingWorkload(range_ratio=1.0)
    assert named_workloads(["mixed", "fixed"], 400, 100, 50, 0.5, 3) == [mixed, ServingWorkload(400, 100, 50, seed=3)]
    with pytest.raises(ValueError, match="choose from fixed, mixed"):
        named_workloads(["sharegpt"], 4, 8, 8, 0.5, 0)


def test_request_rates():
    assert parse_rates(["inf", "4", "0.5"]) == [None, 4.0, 0.5]
    for bad in (["0"], ["-2"], ["nan"], []):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_gpu_sampler_off_or_without_sources_reports_na(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    for sampler in (UtilizationSampler(enabled=False), UtilizationSampler(nvidia_smi="no-such-nvidia-smi")):
        with sampler:
            pass
        assert sampler.summary() == {"gpu_util_mean_pct": None, "gpu_util_max_pct": None, "gpu_util_samples": 0,
                                     "gpu_util_source": "n/a"}


def _sample_fake_nvidia_smi(tmp_path, monkeypatch, script: str, samples: int, device: str = "0"):
    """Run a UtilizationSampler over a fake nvidia-smi (``script``: its sh body, pynvml hidden) until it has read
    ``samples`` lines, then stop it; returns the stopped sampler."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    sampler = UtilizationSampler(interval_s=0.05, device=device, nvidia_smi=str(fake))
    with sampler:
        deadline = time.monotonic() + 30  # the fake's start-up can take seconds on a loaded CI machine
        while len(sampler.samples) < samples and time.monotonic() < deadline:
            time.sleep(0.01)
    return sampler


def test_gpu_sampler_reads_nvidia_smi_lines(tmp_path, monkeypatch):
    script = f"echo \"$@\" > {tmp_path}/args\nprintf '40\\n80 %%\\n\\n'\nexec sleep 30\n"
    sampler = _sample_fake_nvidia_smi(tmp_path, monkeypatch, script, samples=2, device="1")
    assert sampler.summary() == {"gpu_util_mean_pct": 60.0, "gpu_util_max_pct": 80.0, "gpu_util_samples": 2,
                                 "gpu_util_source": "nvidia-smi"}
    args = (tmp_path / "args").read_text().split()
    assert "--loop-ms=50" in args and "--id=1" in args and "--query-gpu=utilization.gpu" in args
    assert sampler._process.poll() is not None  # the subprocess was stopped
    assert parse_utilization("utilization.gpu [%]") is None and parse_utilization(" 7 % ") == 7.0


def test_gpu_sampler_ends_an_nvidia_smi_that_ignores_sigint(tmp_path, monkeypatch):
    """nvidia-smi may ignore SIGINT (a process started from a background shell inherits it ignored; a clean-clone CI
    run found the sampler's subprocess alive after stop()): the sampler waits 5 s for the loop to end, then kills it
    and reaps it."""
    script = "trap '' INT\nprintf '55\\n'\nwhile :; do sleep 1; done\n"
    sampler = _sample_fake_nvidia_smi(tmp_path, monkeypatch, script, samples=1)
    assert sampler._process.returncode is not None  # killed and reaped (wait() set it; poll() would race the kill)
    assert sampler.summary()["gpu_util_mean_pct"] == 55.0


def test_gpu_sampler_prefers_nvml(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: calls.append(i) or "handle",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with UtilizationSampler(interval_s=0.01, device="0", nvidia_smi=None) as sampler:
        time.sleep(0.05)
    summary = sampler.summary()
    assert calls == [0] and summary["gpu_util_source"] == "nvml" and summary["gpu_util_mean_pct"] == 50.0
    assert summary["gpu_util_samples"] >= 1


def _row(engine, mode, rate, tok_s, workload="fixed 8/4"):
    m = summarize([timing_from_token_times(0.0, [0.5, 1.0])])
    return {**m, "engine": engine, "mode": mode, "workload": workload, "request_rate": rate,
            "output_tokens_per_s": tok_s, "gpu_util_mean_pct": None if engine == "transformers" else 91.0}


def test_table_speedup_and_plot(tmp_path):
    rows = [_row("autoglm-jax", "dynamic batching", None, 12000.0), _row("autoglm-jax", "dynamic batching", 4.0, 900.0),
            _row("transformers", "continuous batching (generate_batch)", None, 2000.0),
            _row("autoglm-jax", "dynamic batching", None, 5000.0, workload="mixed 8/4 ±90%")]
    table = markdown_table(rows).splitlines()
    assert len(table) == 6 and table[1].count("---") == table[0].count("|") - 1
    assert "| autoglm-jax | dynamic batching | fixed 8/4 | 4/s | 1 | 900 |" in table[3]
    assert table[2].endswith("| 91 |") and table[4].endswith("| n/a |")
    lines = speedups(rows)
    assert len(lines) == 1 and "12,000 output tok/s" in lines[0] and "= 6.00x transformers" in lines[0]
    plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
