"""Device-time accounting from a JAX profiler trace: busy time, idle gaps and the top kernels.

Owns: running a callable under ``jax.profiler.trace`` and reading the resulting XSpace back with
``jax.profiler.ProfileData`` (no TensorBoard needed). On GPU the device planes are ``/device:GPU:N``
and each kernel is an event on a stream line; the busy time is the union of the kernel intervals, so
overlapping streams are not double counted. On CPU there is no device plane and the summary says so;
``backend_planes()`` names the planes that stand in for one there (the PjRt CPU client's executions).

    summary = profile_device(lambda: step(...), warmup=1)
    summary.busy_fraction   # busy / span: 1 - the device's idle share while the callable ran
    summary.top(10)         # [(kernel or HLO op name, total ms, calls)]
    summary.long_gaps       # "kernel before -> kernel after" of each idle gap >= LONG_GAP_US: (ms, count)
    summary.host_in_gaps    # what the host threads were doing at those gaps' midpoints: (ms, count)

Where a long gap sits (between which kernels) and what the host was in meanwhile (the innermost event
of each host thread line at the gap's midpoint: a Python function of the ``python`` line, an XLA runtime
event of a client thread) tell a host round trip inside a program (a while loop's predicate read, a
conditional) from the host's own work between calls.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import os
import re
import tempfile
import threading
import time
from concurrent.futures import Future
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
    long_gaps: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)
    host_in_gaps: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)

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
        for title, table in ((f"idle gaps >= {LONG_GAP_US / 1000:g} ms between", self.long_gaps),
                             ("host at those gaps' midpoints", self.host_in_gaps)):
            if table:
                lines.append(f"  {title}:")
                lines += [f"    {ms:9.3f} ms {count:6d}x  {name[:130]}" for name, (ms, count) in _ranked(table, n)]
        lines += [f"  {ms:9.3f} ms {calls:6d}x  {name[:110]}" for name, ms, calls in self.top(n)]
        return "\n".join(lines)


def _ranked(table: dict[str, tuple[float, int]], n: int) -> list[tuple[str, tuple[float, int]]]:
    return sorted(table.items(), key=lambda kv: -kv[1][0])[:n]


GAP_BUCKETS_US = ((5.0, "< 5 us"), (50.0, "5-50 us"), (1000.0, "50 us-1 ms"), (float("inf"), ">= 1 ms"))
LONG_GAP_US = 1000.0  # gaps this long are located (kernels around them, host meanwhile)
_LINE_ID = re.compile(r"/-?\d+$")


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


def _add_gaps(gaps: list[tuple[int, int, str]], hist: dict[str, list]) -> None:
    """Adds ``idle_gaps`` (ns) to ``hist`` by ``GAP_BUCKETS_US`` (name -> [total ms, count])."""
    for start, stop, _ in gaps:
        gap_us = (stop - start) / 1e3
        name = next(name for limit, name in GAP_BUCKETS_US if gap_us < limit)
        hist[name][0] += gap_us / 1e3
        hist[name][1] += 1


def gap_histogram(intervals: list[tuple[int, int]]) -> dict[str, list]:
    """Idle gaps between the merged busy intervals (ns) by ``GAP_BUCKETS_US``: name -> [total ms, count]."""
    hist = _empty_gaps()
    _add_gaps(idle_gaps([(start, stop, "") for start, stop in intervals]), hist)
    return hist


Event = tuple[int, int, str]  # (start ns, stop ns, name)


def idle_gaps(events: list[Event]) -> list[tuple[int, int, str]]:
    """The idle gaps between the union of one device's kernel ``events`` (overlapping or touching events
    are one busy interval): [(gap start ns, gap stop ns, "last kernel to end before -> first to start after")]."""
    gaps = []
    busy_until, last_name = None, None
    for start, stop, name in sorted(events):
        if busy_until is not None and start > busy_until:
            gaps.append((busy_until, start, f"{last_name} -> {name}"))
        if busy_until is None or stop >= busy_until:
            busy_until, last_name = stop, name
    return gaps


def locate_long_gaps(events: list[Event], min_gap_us: float = LONG_GAP_US) -> list[tuple[int, int, str]]:
    """The ``idle_gaps`` of at least ``min_gap_us``."""
    return _long(idle_gaps(events), min_gap_us)


def _long(gaps: list[tuple[int, int, str]], min_gap_us: float = LONG_GAP_US) -> list[tuple[int, int, str]]:
    return [gap for gap in gaps if (gap[1] - gap[0]) / 1e3 >= min_gap_us]


def host_at(lines: dict[str, list[Event]], gaps: list[tuple[int, int, str]]) -> dict[str, list]:
    """For each gap, the innermost event of each host line at the gap's midpoint (events of one thread
    nest: the latest-starting one that covers it): "line: event" -> [gap ms, gaps]. Each line's events are
    sorted once and searched from the last one to start before the midpoint (a traced second of serving
    holds ~10^5-10^6 Python events)."""
    found: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for line, events in lines.items():
        events = sorted(events)
        starts = [start for start, _, _ in events]
        for gap_start, gap_stop, _ in gaps:
            mid = (gap_start + gap_stop) // 2
            i = bisect.bisect_right(starts, mid) - 1
            while i >= 0 and events[i][1] <= mid:  # ended before the midpoint: an earlier sibling
                i -= 1
            if i >= 0:
                key = f"{line}: {events[i][2]}"
                found[key][0] += (gap_stop - gap_start) / 1e6
                found[key][1] += 1
    return found


def _host_lines(data, host_prefix: str = "/host:") -> dict[str, list[Event]]:
    """Every host plane's thread lines -> their events (line ids dropped from the names, lines of one
    name pooled: a thread pool's workers)."""
    lines: dict[str, list[Event]] = collections.defaultdict(list)
    for plane in data.planes:
        if not plane.name.startswith(host_prefix):
            continue
        for line in plane.lines:
            key = _LINE_ID.sub("", line.name) or "(unnamed thread)"
            lines[key] += [(int(e.start_ns), int(e.start_ns) + int(e.duration_ns), e.name) for e in line.events]
    return lines


def summarize_xspace(path: str, device_prefix: str = "/device:GPU:", line_contains: str = "stream") -> DeviceProfile:
    """A DeviceProfile of the events of every ``device_prefix*`` plane in an .xplane.pb file, on the
    lines whose name contains ``line_contains`` (GPU: the stream lines, where the kernels are); its long
    gaps located against the kernels around them and the host planes' threads."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    per_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    first, last, busy, count, devices = None, None, 0.0, 0, 0
    gaps = _empty_gaps()
    located = []
    for plane in data.planes:
        if not plane.name.startswith(device_prefix):
            continue
        intervals, events = [], []
        for line in plane.lines:
            if line_contains.lower() not in line.name.lower():
                continue
            for event in line.events:
                start, duration = int(event.start_ns), int(event.duration_ns)
                intervals.append((start, start + duration))
                stats = dict(event.stats)
                name = str(stats.get("hlo_op") or event.name)
                events.append((start, start + duration, name))
                per_op[name][0] += duration / 1e6
                per_op[name][1] += 1
        if not intervals:
            continue
        devices += 1
        count += len(intervals)
        busy += _union_ms(intervals)
        device_gaps = idle_gaps(events)
        _add_gaps(device_gaps, gaps)
        located += _long(device_gaps)
        lo, hi = min(s for s, _ in intervals), max(e for _, e in intervals)
        first = lo if first is None else min(first, lo)
        last = hi if last is None else max(last, hi)
    span = (last - first) / 1e6 if devices else 0.0
    long_gaps: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for gap_start, gap_stop, where in located:
        long_gaps[where][0] += (gap_stop - gap_start) / 1e6
        long_gaps[where][1] += 1
    host = host_at(_host_lines(data), located) if located else {}

    def frozen(table):
        return {k: (v[0], v[1]) for k, v in table.items()}

    return DeviceProfile(span, busy, count, devices, frozen(per_op), frozen(gaps), frozen(long_gaps), frozen(host))


def backend_planes(backend: str | None = None) -> dict:
    """``summarize_xspace`` arguments that find the kernels of ``backend`` (default: JAX's): the GPU
    stream lines, or on CPU the PjRt CPU client's execution lines (a smoke-run stand-in for a device)."""
    if (backend or jax.default_backend()) == "cpu":
        return dict(device_prefix="/host:CPU", line_contains="PjRtCpuClient")
    return {}


def _trace(run: Callable[[], None], summary_args: dict, python_tracer: bool = True) -> DeviceProfile:
    """Runs ``run`` under the profiler and summarizes the trace's device planes (``summarize_xspace`` args).
    ``python_tracer=False`` leaves Python function events out of the trace: the tracer slows the host
    several-fold, so a device busy share meant for the untraced engine is measured without it."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 1 if python_tracer else 0
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, profiler_options=options):
            run()
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {tmp}")
        return summarize_xspace(max(files, key=os.path.getmtime), **summary_args)


def profile_device(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 1, python_tracer: bool = True,
                   **summary_args) -> DeviceProfile:
    """Runs ``fn`` ``warmup`` times untraced (compilation), then ``repeats`` times under the profiler,
    blocking on each result, and summarizes the device planes of the trace (``summarize_xspace`` args;
    ``python_tracer``: see ``_trace``)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())

    def run():
        for _ in range(repeats):
            jax.block_until_ready(fn())

    return _trace(run, summary_args, python_tracer)


def profile_window(delay_s: float, duration_s: float, **summary_args) -> Future:
    """Traces whatever the process runs from ``delay_s`` to ``delay_s + duration_s`` seconds from now (a
    background thread starts and stops the profiler; e.g. the middle of a serving run, whose engine thread
    is left alone). The future's result is the window's DeviceProfile (``summarize_xspace`` args)."""
    if delay_s < 0 or duration_s <= 0:
        raise ValueError(f"profile window delay_s={delay_s}, duration_s={duration_s}: need delay >= 0 and duration > 0")
    result: Future = Future()

    def trace():
        try:
            time.sleep(delay_s)
            result.set_result(_trace(lambda: time.sleep(duration_s), summary_args))
        except BaseException as error:  # handed to the caller through the future
            result.set_exception(error)

    threading.Thread(target=trace, name="profile-window", daemon=True).start()
    return result
