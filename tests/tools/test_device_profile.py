"""The profiler-trace reader: interval union, and a real trace read back (CPU planes stand in for GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from autoglm_jax.tools.device_profile import _union_ms, profile_device


def test_union_counts_overlapping_intervals_once():
    assert _union_ms([(0, 1_000_000), (500_000, 2_000_000), (3_000_000, 4_000_000)]) == 3.0
    assert _union_ms([(5, 10), (0, 20)]) == 20 / 1e6
    assert _union_ms([]) == 0


def test_profile_reads_back_the_ops_of_a_traced_call():
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jax.random.normal(jax.random.key(0), (256, 256))
    summary = profile_device(lambda: f(x), repeats=3, device_prefix="/host:CPU", line_contains="PjRtCpuClient")
    assert summary.num_devices == 1 and summary.num_kernels >= 3
    assert 0 < summary.busy_ms <= summary.span_ms
    assert any("sin" in name for name, _, calls in summary.top(20))
    gpu = profile_device(lambda: f(x))  # no GPU plane on a CPU run: says so instead of inventing numbers
    assert gpu.num_devices == 0 and "not measured" in gpu.format()


def test_by_kind_merges_the_instances_of_one_op():
    from autoglm_jax.tools.device_profile import DeviceProfile

    profile = DeviceProfile(10.0, 8.0, 6, 1, {"gemm_fusion_dot.321": (3.0, 2), "gemm_fusion_dot.247": (1.0, 2),
                                              "cond.7.clone": (0.5, 1), "command_buffer_11": (2.0, 1),
                                              "fusion": (1.5, 1)})
    merged = profile.by_kind().per_op
    assert merged == {"gemm_fusion_dot": (4.0, 4), "cond": (0.5, 1), "command_buffer_11": (2.0, 1),
                      "fusion": (1.5, 1)}
    assert profile.by_kind().busy_ms == 8.0 and profile.by_kind().top(1)[0] == ("gemm_fusion_dot", 4.0, 4)


def test_gap_histogram_buckets_the_idle_time_between_merged_intervals():
    from autoglm_jax.tools.device_profile import gap_histogram

    us = 1_000  # ns
    intervals = [(0, 10 * us), (5 * us, 12 * us),  # overlapping: one busy interval, no gap
                 (14 * us, 20 * us),               # 2 us gap
                 (40 * us, 50 * us),               # 20 us gap
                 (250 * us, 260 * us),             # 200 us gap
                 (2_260 * us, 2_261 * us)]         # 2 ms gap
    hist = gap_histogram(intervals)
    assert hist["< 5 us"] == [pytest.approx(0.002), 1]
    assert hist["5-50 us"] == [pytest.approx(0.020), 1]
    assert hist["50 us-1 ms"] == [pytest.approx(0.200), 1]
    assert hist[">= 1 ms"] == [pytest.approx(2.0), 1]
    assert gap_histogram([(0, 1)]) == {name: [0.0, 0] for name in hist}


def test_long_gaps_are_located_between_kernels_and_against_the_host_threads():
    from autoglm_jax.tools.device_profile import host_at, locate_long_gaps

    us = 1_000  # ns
    kernels = [(0, 10 * us, "gemm.1"), (5 * us, 30 * us, "gemm.2"),   # overlapping: busy until 30 us
               (31 * us, 40 * us, "norm"),                            # 1 us gap: not long
               (2_040 * us, 2_050 * us, "attention"),                 # 2 ms gap after norm
               (2_060 * us, 2_070 * us, "merge"),
               (5_070 * us, 5_080 * us, "gemm.1")]                    # 3 ms gap after merge
    gaps = locate_long_gaps(kernels)
    assert gaps == [(40 * us, 2_040 * us, "norm -> attention"), (2_070 * us, 5_070 * us, "merge -> gemm.1")]
    assert locate_long_gaps(kernels, min_gap_us=2_500) == gaps[1:]
    host = {"python": [(0, 6_000 * us, "$engine.py:10 step"), (1_000 * us, 1_100 * us, "$runner.py:5 run"),
                       (3_000 * us, 4_000 * us, "$gc")],          # innermost at the second gap's midpoint
            "XLAPjRtClient": [(0, 2_050 * us, "WhileThunk"), (900 * us, 1_200 * us, "MemcpyD2H")]}
    found = host_at(host, gaps)
    assert found == {"python: $runner.py:5 run": [pytest.approx(2.0), 1], "XLAPjRtClient: MemcpyD2H": [pytest.approx(2.0), 1],
                     "python: $gc": [pytest.approx(3.0), 1]}


def test_a_real_trace_names_what_the_host_did_in_a_long_gap():
    import time

    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jax.random.normal(jax.random.key(0), (128, 128))

    def two_calls_apart():
        f(x).block_until_ready()
        time.sleep(0.004)  # the "device" (CPU client) idles >= 4 ms while the host sleeps
        return f(x)

    summary = profile_device(two_calls_apart, device_prefix="/host:CPU", line_contains="PjRtCpuClient")
    assert summary.gaps[">= 1 ms"][1] >= 1 and sum(count for _, count in summary.long_gaps.values()) >= 1
    assert any("sleep" in where for where in summary.host_in_gaps), summary.host_in_gaps
    assert "host at those gaps' midpoints" in summary.format()
