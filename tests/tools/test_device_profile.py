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
