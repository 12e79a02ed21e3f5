"""``benchmarks/_timing.time_ms``'s warm-up: time-based in one process, a fixed count of calls in a job of several
(each call may be a collective that every process must make as often as the others)."""

import pathlib
import sys
import time

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import _timing  # noqa: E402


def counting_fn():
    calls = []

    def fn(x):
        calls.append(time.perf_counter())
        return x

    return fn, calls


def test_one_process_warms_up_for_the_given_time():
    fn, calls = counting_fn()
    began = time.perf_counter()
    _timing.time_ms(fn, jax.numpy.ones(4), iterations=2, warmup_s=0.1)
    timed = 5 * 2
    assert calls[-timed - 1] - began >= 0.1  # the last warm-up call came after warmup_s
    assert len(calls) > 1 + timed


@pytest.mark.parametrize("warmup_s", [0.0, 0.1])
def test_several_processes_make_the_same_number_of_calls_whatever_the_time(monkeypatch, warmup_s):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    fn, calls = counting_fn()
    _timing.time_ms(fn, jax.numpy.ones(4), iterations=3, warmup_s=warmup_s)
    assert len(calls) == 1 + _timing.WARMUP_BATCHES * 3 + 5 * 3
