"""Device-time accounting from a JAX profiler trace: busy time, idle gaps and the top kernels.

Owns: running a callable under ``jax.profiler.trace`` and reading the resulting XSpace back with
``jax.profiler.ProfileData`` (no TensorBoard needed). On GPU the device planes are ``/device:GPU:N``
and each kernel is an event on a stream line; the busy time is the union of the kernel intervals, so
overlapping streams are not double counted. On CPU there is no device plane and the summary says so;
``backend_planes()`` names the planes that stand in for one there (the PjRt CPU client's executions).

    summary = profile_device(lambda: step(...), warmup=1)
    summary.busy_fraction   # busy / span: 1 - the device's idle share while the callable ran
    summary.top(10)         # [(kernel or HLO op name, total ms, calls)]
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
from typing import Callable

import jax


_KIND_SUFFIX = re.compile(r"(\.\d+)+(\.clone)?$")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    span_ms: float                 # first kernel start -> last kernel end, over all profiled devices
    busy_ms: float                 # union of kernel intervals (per device, summed over devices)
    num_kernels: int
    num_devices: int
    per_op: dict[str, tuple[float, int]]  # name -> (total ms, calls)
    # idle gaps between consecutive busy intervals of a device, by length: bucket -> (total ms, count).
    # Short gaps are launch / dependency gaps inside a program; long ones are host round trips (a while
    # loop's predicate read, the host between engine calls).
    gaps: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)

    @property
    def busy_fraction(self) -> float:
        return self.busy_ms / (self.span_ms * self.num_devices) if self.span_ms > 0 else 0.0

    def top(self, n: int = 10) -> list[tuple[str, float, int]]:
        ranked = sorted(self.per_op.items(), key=lambda kv: -kv[1][0])[:n]
        return [(name, ms, calls) for name, (ms, calls) in ranked]

    def by_kind(self) -> "DeviceProfile":
        """The same profile with ops merged by kind: the HLO instance suffix dropped
        (``gemm_fusion_dot.321`` and ``gemm_fusion_dot.247`` -> ``gemm_fusion_dot``), so an unrolled
        model's per-layer copies of one op add up."""
        merged: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for name, (ms, calls) in self.per_op.items():
            kind = _KIND_SUFFIX.sub("", name)
            merged[kind][0] += ms
            merged[kind][1] += calls
        return dataclasses.replace(self, per_op={k: (v[0], v[1]) for k, v in merged.items()})

    def format(self, n: int = 10) -> str:
        if not self.num_devices:
            return "no device plane in the trace (CPU run): device time not measured"
        lines = [f"device span {self.span_ms:.2f} ms, busy {self.busy_ms:.2f} ms over {self.num_devices} device(s) "
                 f"({self.busy_fraction:.1%} busy), {self.num_kernels} kernels"]
        if self.gaps:
            lines.append("  idle gaps: " + ", ".join(f"{name} {ms:.3f} ms in {count}" for name, (ms, count) in self.gaps.items()))
        lines += [f"  {ms:9.3f} ms {calls:6d}x  {name[:110]}" for name, ms, calls in self.top(n)]
        return "\n".join(lines)


GAP_BUCKETS_US = ((5.0, "< 5 us"), (50.0, "5-50 us"), (1000.0, "50 us-1 ms"), (float("inf"), ">= 1 ms"))


def _merged(intervals: list[tuple[int, int]]) -> list[list[int]]:
    """The union of [start, stop) intervals (ns) as sorted disjoint intervals."""
    merged: list[list[int]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def _union_ms(intervals: list[tuple[int, int]]) -> float:
    return sum(stop - start for start, stop in _merged(intervals)) / 1e6


def _empty_gaps() -> dict[str, list]:
    return {name: [0.0, 0] for _, name in GAP_BUCKETS_US}


def _add_gaps(merged: list[list[int]], hist: dict[str, list]) -> None:
    """Adds the idle gaps between ``_merged`` busy intervals (ns) to ``hist`` (name -> [total ms, count])."""
    for (_, stop), (start, _) in zip(merged, merged[1:]):
        gap_us = (start - stop) / 1e3
        name = next(name for limit, name in GAP_BUCKETS_US if gap_us < limit)
        hist[name][0] += gap_us / 1e3
        hist[name][1] += 1


def gap_histogram(intervals: list[tuple[int, int]]) -> dict[str, list]:
    """Idle gaps between the merged busy intervals (ns) by ``GAP_BUCKETS_US``: name -> [total ms, count]."""
    hist = _empty_gaps()
    _add_gaps(_merged(intervals), hist)
    return hist


def summarize_xspace(path: str, device_prefix: str = "/device:GPU:", line_contains: str = "stream") -> DeviceProfile:
    """A DeviceProfile of the events of every ``device_prefix*`` plane in an .xplane.pb file, on the
    lines whose name contains ``line_contains`` (GPU: the stream lines, where the kernels are)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    per_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    first, last, busy, count, devices = None, None, 0.0, 0, 0
    gaps = _empty_gaps()
    for plane in data.planes:
        if not plane.name.startswith(device_prefix):
            continue
        intervals = []
        for line in plane.lines:
            if line_contains.lower() not in line.name.lower():
                continue
            for event in line.events:
                start, duration = int(event.start_ns), int(event.duration_ns)
                intervals.append((start, start + duration))
                stats = dict(event.stats)
                name = str(stats.get("hlo_op") or event.name)
                per_op[name][0] += duration / 1e6
                per_op[name][1] += 1
        if not intervals:
            continue
        devices += 1
        count += len(intervals)
        merged = _merged(intervals)
        busy += sum(stop - start for start, stop in merged) / 1e6
        _add_gaps(merged, gaps)
        lo, hi = min(s for s, _ in intervals), max(e for _, e in intervals)
        first = lo if first is None else min(first, lo)
        last = hi if last is None else max(last, hi)
    span = (last - first) / 1e6 if devices else 0.0
    return DeviceProfile(span, busy, count, devices, {k: (v[0], v[1]) for k, v in per_op.items()},
                         {k: (v[0], v[1]) for k, v in gaps.items()})


def backend_planes(backend: str | None = None) -> dict:
    """``summarize_xspace`` arguments that find the kernels of ``backend`` (default: JAX's): the GPU
    stream lines, or on CPU the PjRt CPU client's execution lines (a smoke-run stand-in for a device)."""
    if (backend or jax.default_backend()) == "cpu":
        return dict(device_prefix="/host:CPU", line_contains="PjRtCpuClient")
    return {}


def profile_device(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 1, **summary_args) -> DeviceProfile:
    """Runs ``fn`` ``warmup`` times untraced (compilation), then ``repeats`` times under the profiler,
    blocking on each result, and summarizes the device planes of the trace (``summarize_xspace`` args)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(repeats):
                jax.block_until_ready(fn())
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {tmp}")
        return summarize_xspace(max(files, key=os.path.getmtime), **summary_args)
