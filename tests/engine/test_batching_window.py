"""BatchingWindow: deterministic wait decisions from given timestamps."""

import pytest

from autoglm_jax.engine.batching_window import BatchingWindow, BatchingWindowConfig


def window_with_arrivals(gap_s: float, count: int = 6, start: float = 50.0, **config) -> tuple[BatchingWindow, float]:
    """Arrivals every ``gap_s``; each but the last is served by a (slow, 1 s) step right away."""
    window = BatchingWindow(BatchingWindowConfig(**config))
    t = start
    for i in range(count):
        t = start + i * gap_s
        window.record_arrival(t)
        if i < count - 1:
            window.record_step(1.0, batch_size=1)
    return window, t


@pytest.mark.parametrize(
    "num_waiting, num_running, max_batch_size, config",
    [
        (0, 0, 8, {}),                  # nothing to batch
        (4, 4, 8, {}),                  # batch already full
        (1, 0, 8, {"enabled": False}),  # window off
    ],
)
def test_no_wait(num_waiting, num_running, max_batch_size, config):
    window, last = window_with_arrivals(0.002, max_wait_ms=10.0, min_wait_ms=1.0, **config)
    assert window.wait_time(last, num_waiting, num_running, max_batch_size) == 0.0


def test_busy_engine_waits_only_the_minimum():
    window, last = window_with_arrivals(0.002, max_wait_ms=10.0, min_wait_ms=0.5)
    assert window.wait_time(last, num_waiting=1, num_running=3, max_batch_size=8) == pytest.approx(0.0005)


def test_no_rate_estimate_waits_the_minimum():
    window = BatchingWindow(BatchingWindowConfig(min_wait_ms=0.25))
    window.record_arrival(3.0)
    assert window.wait_time(3.0, 1, 0, 8) == pytest.approx(0.00025)


def test_wait_tracks_the_arrival_gap():
    for gap in (0.001, 0.003, 0.006):
        window, last = window_with_arrivals(gap, max_wait_ms=10.0)
        assert window.inter_arrival_s == pytest.approx(gap)
        assert window.wait_time(last, 1, 0, 8) == pytest.approx(gap)  # until the expected arrival
    dense, last_dense = window_with_arrivals(0.001, max_wait_ms=10.0)
    sparse, last_sparse = window_with_arrivals(0.006, max_wait_ms=10.0)
    assert dense.wait_time(last_dense, 1, 0, 8) < sparse.wait_time(last_sparse, 1, 0, 8)


def test_too_sparse_traffic_is_not_waited_for():
    window, last = window_with_arrivals(0.050, max_wait_ms=10.0, min_wait_ms=0.1)
    assert window.wait_time(last, 1, 0, 8) == pytest.approx(0.0001)


def test_step_latency_bounds_the_window():
    window, last = window_with_arrivals(0.004, max_wait_ms=10.0, ewma_alpha=1.0)
    window.record_step(0.002, batch_size=4)  # a step is cheaper than waiting for the next arrival
    window.record_arrival(last + 0.004)
    assert window.step_latency_s == pytest.approx(0.002)
    assert window.wait_time(last + 0.004, 1, 0, 8) == 0.0
    window.record_step(5.0, batch_size=0)  # empty steps do not move the estimate
    assert window.step_latency_s == pytest.approx(0.002)


def test_total_wait_never_exceeds_the_bound_since_the_window_opened():
    window, last = window_with_arrivals(0.004, max_wait_ms=10.0)
    window.record_step(0.050, batch_size=2)
    opened = last + 0.001
    window.record_arrival(opened)  # opens a new window
    now, waited = opened, 0.0
    for _ in range(5):  # each arrival comes at the expected time and the engine re-asks
        wait = window.wait_time(now, 1, 0, 8)
        if wait == 0.0:
            break
        waited += wait
        now += wait
        window.record_arrival(now)
    assert waited == pytest.approx(0.010) and window.wait_time(now, 1, 0, 8) == 0.0


def test_overdue_arrival_waits_the_minimum_until_the_deadline():
    window, last = window_with_arrivals(0.002, max_wait_ms=10.0, min_wait_ms=0.5)
    assert window.wait_time(last + 0.003, 1, 0, 8) == pytest.approx(0.0005)
    assert window.wait_time(last + 0.0098, 1, 0, 8) == pytest.approx(0.0002)  # capped by the deadline


def test_ewma_weights_recent_gaps():
    window = BatchingWindow(BatchingWindowConfig(ewma_alpha=0.5))
    for t in (0.0, 1.0, 1.5):
        window.record_arrival(t)
    assert window.inter_arrival_s == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="min_wait_ms=5"):
        BatchingWindowConfig(min_wait_ms=5.0, max_wait_ms=1.0)
    with pytest.raises(ValueError, match="ewma_alpha=0"):
        BatchingWindowConfig(ewma_alpha=0.0)
    window = BatchingWindow()
    window.record_arrival(2.0)
    with pytest.raises(ValueError, match="before the previous arrival"):
        window.record_arrival(1.0)
    with pytest.raises(ValueError, match="latency_s=-1"):
        window.record_step(-1, 1)
