"""Engine step log: one compact row per engine call, and where a run's wall time went.

Owns: ``StepLog`` (the rows, a bounded ring, and the timing of ``ModelRunner._fetch``, the one place
the host waits for a call's tokens) and ``summarize_steps`` / ``format_step_summary`` over its rows.
It does not own when it is on: ``EngineCore.enable_step_log()`` attaches one (off by default: no log,
no timing, one ``is None`` test per step) and ``EngineCore.step`` feeds it through ``begin`` /
``record`` / ``end``.

One row per ``EngineCore.step()`` call that processed a device call (an empty step records nothing).
With async scheduling a ``step()`` dispatches the *next* call, then reads and applies the current one:
its row is the call it read, and its host times are that ``step()``'s (the next call's scheduling and
dispatch included). Times are ``time.perf_counter`` seconds:

  t_begin / t_end    ``step()`` entry and exit
  t_tokens           when the call's tokens were on the host (``_fetch`` returned; with a runner that
                     has no ``_fetch``, e.g. a multi-host wrapper: when ``record`` ran)
  mixed              the call fed prefill tokens (a prompt chunk, with or without decodes); else decode-only
  prefill_tokens     prompt tokens fed; decode_rows: sequences fed their last sampled token
  decode_steps       model steps the call ran (1 for a mixed call; up to ``decode_steps_per_call`` for a
                     decode call: the most tokens any row sampled, dropped rows included)
  generated          tokens kept (a finished sequence's tokens computed ahead are dropped, as in metrics)
  blocked_s          wall seconds the ``step()`` blocked in ``_fetch`` (waiting for the device)
  host_cpu_s         thread CPU seconds of the ``step()`` outside ``_fetch``
  ahead              the call was dispatched by an earlier ``step()`` (before the previous call's tokens
                     were read: the device had it queued); False = the device idled while the host planned it

While attached it also keeps the runner's ``LaunchRecord``s (``runner.launch_log``: one per program call
the launch thread makes) and summarizes them (``summarize_launches``): how soon each program was called
after the one before returned, the device's idle time at that boundary.

Wall attribution (``summarize_steps``): each call owns the time from the previous call's t_tokens (the
log's first ``step()`` entry for the first) to its own t_tokens, so the calls' walls add up to the span.
Host busy in a step = (t_end - t_begin) - blocked_s; the engine loop's time between steps (outside
``step()``: publishing outputs, the batching window) is t_begin - the previous row's t_end.
"""

from __future__ import annotations

import collections
import time
from typing import NamedTuple

import numpy as np

from autoglm_jax.engine.metrics import value_summary

DEFAULT_CAPACITY = 1 << 16  # rows kept (a ring): ~3,000 calls for 1,000 x 1,000 tokens at batch 256
PREFILL_BUCKETS = (128, 256, 512, 1024, 2048)  # upper edges of the prefill-tokens-per-mixed-call histogram
KINDS = ("mixed", "decode")


class StepRecord(NamedTuple):
    t_begin: float
    t_tokens: float
    t_end: float
    mixed: bool
    prefill_tokens: int
    decode_rows: int
    decode_steps: int
    generated: int
    blocked_s: float
    host_cpu_s: float
    ahead: bool


class FetchClock:
    """Times ``runner._fetch`` (wrapped on the instance; ``remove`` restores it): wall and thread-CPU
    seconds spent in it, and when it last returned."""

    def __init__(self, runner):
        self.blocked_s = self.cpu_s = 0.0
        self.last_return = -float("inf")
        self._runner, self._own = runner, vars(runner).get("_fetch")  # an instance-level wrapper already there
        fetch = runner._fetch

        def timed(out):
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return fetch(out)
            finally:
                self.cpu_s += time.thread_time() - start_cpu
                self.last_return = now = time.perf_counter()
                self.blocked_s += now - start

        runner._fetch = timed

    def remove(self) -> None:
        if self._own is None:
            vars(self._runner).pop("_fetch", None)
        else:
            self._runner._fetch = self._own


class StepLog:
    """The rows of one engine's calls since it was attached (the last ``capacity`` of them).

    Not thread-safe, like the engine: attach and read it from the thread that steps the engine, or while
    that thread is idle (``AutoGLMEngine`` with no unfinished requests)."""

    def __init__(self, runner=None, capacity: int = DEFAULT_CAPACITY):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be an int >= 1")
        self.rows: collections.deque[StepRecord] = collections.deque(maxlen=capacity)
        self.origin: float | None = None  # the first row's wall starts here (moves on as the ring drops rows)
        self._clock = FetchClock(runner) if runner is not None and hasattr(runner, "_fetch") else None
        # The runner's launch thread logs each program call it makes (LaunchRecord) while a log is attached.
        self.launches: collections.deque | None = None
        self._runner = runner if runner is not None and hasattr(runner, "launch_log") else None
        if self._runner is not None:
            self.launches = self._runner.launch_log = collections.deque(maxlen=capacity)
        self._begin: tuple | None = None  # (t_begin, cpu_begin, blocked_s, fetch cpu_s, ahead) of the step running
        self._call: tuple | None = None   # (t_tokens, mixed, prefill, rows, steps, generated) of its call

    def close(self) -> None:
        """Stops timing the runner's ``_fetch``; the rows stay readable."""
        if self._clock is not None:
            self._clock.remove()
            self._clock = None
        if self._runner is not None and self._runner.launch_log is self.launches:
            self._runner.launch_log = None
        self._runner = None
        self._begin = None

    # ------------------------------------------------------------------ fed by EngineCore.step
    def begin(self, ahead: bool) -> None:
        """``step()`` starts; ``ahead``: a call dispatched by the previous ``step()`` is in flight."""
        clock = self._clock
        blocked, fetch_cpu = (clock.blocked_s, clock.cpu_s) if clock is not None else (0.0, 0.0)
        self._begin = (time.perf_counter(), time.thread_time(), blocked, fetch_cpu, ahead)
        self._call = None
        if self.origin is None:
            self.origin = self._begin[0]

    def record(self, output, sampled: dict, num_generated: int) -> None:
        """The call ``step()`` read: its SchedulerOutput, runner-sampled tokens per sequence (SampledTokens
        or lists) and the tokens kept. Ignored outside ``begin`` / ``end`` (a log attached mid-step)."""
        if self._begin is None:
            return
        clock = self._clock
        t_tokens = clock.last_return if clock is not None and clock.last_return >= self._begin[0] else time.perf_counter()
        decode_rows = prefill = 0
        for seq in output.scheduled:
            if seq.is_decode:
                decode_rows += 1
            else:
                prefill += seq.num_tokens
        if prefill:
            steps = 1
        else:
            steps = max((len(getattr(tokens, "token_ids", tokens)) for tokens in sampled.values()), default=0)
        self._call = (t_tokens, prefill > 0, prefill, decode_rows, steps, num_generated)

    def end(self) -> None:
        """``step()`` returns: appends the row of the call it read (if any)."""
        begin, call, self._begin, self._call = self._begin, self._call, None, None
        if begin is None or call is None:
            return
        t_end, cpu_end = time.perf_counter(), time.thread_time()
        t_begin, cpu_begin, blocked0, fetch_cpu0, ahead = begin
        clock = self._clock
        blocked, fetch_cpu = (clock.blocked_s - blocked0, clock.cpu_s - fetch_cpu0) if clock is not None else (0.0, 0.0)
        if len(self.rows) == self.rows.maxlen:
            self.origin = self.rows[0].t_tokens  # the dropped row's end starts the next one's wall
        self.rows.append(StepRecord(t_begin, call[0], t_end, *call[1:], blocked, cpu_end - cpu_begin - fetch_cpu, ahead))

    def summary(self, buckets: tuple[int, ...] = PREFILL_BUCKETS) -> dict:
        summary = summarize_steps(list(self.rows), self.origin, buckets)
        if self.launches is not None:
            summary["launches"] = summarize_launches(list(self.launches))
        return summary


# ---------------------------------------------------------------------- the summary
def _histogram_labels(buckets: tuple[int, ...]) -> list[str]:
    lows = (0, *buckets)
    return [f"{low + 1}-{high}" for low, high in zip(lows, buckets)] + [f">{buckets[-1]}"]


def summarize_steps(rows: list[StepRecord], origin: float | None = None,
                    buckets: tuple[int, ...] = PREFILL_BUCKETS) -> dict:
    """Where the wall time between ``origin`` (None = the first row's t_begin) and the last row's t_tokens
    went, per kind of call (see the module docstring for the attribution). Times in the result are in
    seconds (``*_s``) or milliseconds (``*_ms``; distributions as mean / p50 / p90 / p99 / max)."""
    if list(buckets) != sorted(set(buckets)) or not buckets or buckets[0] < 1:
        raise ValueError(f"buckets={buckets!r} must be increasing ints >= 1")
    if not rows:
        return {"calls": 0, "span_s": 0.0, "kinds": {}}
    t_tokens = np.array([r.t_tokens for r in rows])
    start = rows[0].t_begin if origin is None else origin
    wall = np.diff(t_tokens, prepend=start)  # [calls] s
    host = np.array([r.t_end - r.t_begin - r.blocked_s for r in rows])  # [calls] s in step() not blocked
    span = float(t_tokens[-1] - start)
    mixed = np.array([r.mixed for r in rows])
    kinds = {}
    for kind, mask in (("mixed", mixed), ("decode", ~mixed)):
        picked = [r for r, m in zip(rows, mask) if m]
        wall_s, steps = float(wall[mask].sum()), sum(r.decode_steps for r in picked)
        generated = sum(r.generated for r in picked)
        kinds[kind] = {
            "calls": len(picked), "wall_s": wall_s, "wall_fraction": wall_s / span if span > 0 else 0.0,
            "wall_ms": value_summary((wall[mask] * 1e3).tolist()), "generated_tokens": generated,
            "tokens_per_s": generated / wall_s if wall_s > 0 else 0.0, "decode_steps": steps,
            "ms_per_decode_step": wall_s * 1e3 / steps if steps else None,
            "prefill_tokens": sum(r.prefill_tokens for r in picked),
            "decode_rows_mean": sum(r.decode_rows for r in picked) / len(picked) if picked else None,
            "host_ms": value_summary((host[mask] * 1e3).tolist()),
            "host_cpu_ms_mean": 1e3 * sum(r.host_cpu_s for r in picked) / len(picked) if picked else None,
            "blocked_ms": value_summary([r.blocked_s * 1e3 for r in picked]),
            "ahead_fraction": sum(r.ahead for r in picked) / len(picked) if picked else None,
        }
    prefill = [r.prefill_tokens for r in rows if r.mixed]
    counts = np.bincount(np.searchsorted(np.asarray(buckets), prefill, side="left"), minlength=len(buckets) + 1)
    gaps = [b.t_begin - a.t_end for a, b in zip(rows, rows[1:])]
    generated = sum(r.generated for r in rows)
    return {
        "calls": len(rows), "span_s": span, "generated_tokens": generated,
        "tokens_per_s": generated / span if span > 0 else 0.0,
        "prefill_tokens": sum(prefill), "kinds": kinds,
        "prefill_tokens_per_mixed_call": dict(zip(_histogram_labels(buckets), counts.tolist())),
        "host_s": float(host.sum()), "host_fraction": float(host.sum()) / span if span > 0 else 0.0,
        "loop_gap_s": float(sum(gaps)), "loop_gap_ms": value_summary([g * 1e3 for g in gaps]),
    }


def summarize_launches(records: list) -> dict:
    """The launch thread's calls (``runner.LaunchRecord``s, in call order): how each call followed the one
    before. ``queued``: handed over before the previous call returned, so the launch thread could start
    it at once; ``handoff_ms``: for those, the previous call's return to this one's program call (the
    device idles at least this long when the previous call returned at its program's end); ``late_ms``:
    for the others, how long after the previous call's return the engine thread handed it over;
    ``arguments_ms``: the launch thread's Python from taking a call up to the program call. ``call_ms``:
    each kind's program calls (a call holds its thread until the program's last host-read predicate)."""
    pairs = list(zip(records, records[1:]))
    queued = [b.t_call - a.t_return for a, b in pairs if b.t_submit <= a.t_return]
    late = [b.t_submit - a.t_return for a, b in pairs if b.t_submit > a.t_return]
    call_ms = {kind: value_summary([(r.t_return - r.t_call) * 1e3 for r in records if r.kind == kind])
               for kind in KINDS}
    return {"calls": len(records), "queued_fraction": len(queued) / len(pairs) if pairs else None,
            "handoff_ms": value_summary([g * 1e3 for g in queued]), "late_ms": value_summary([g * 1e3 for g in late]),
            "arguments_ms": value_summary([(r.t_call - r.t_enter) * 1e3 for r in records]), "call_ms": call_ms}


def format_launch_summary(launches: dict) -> str:
    """``summarize_launches``' result as one line."""
    if not launches["calls"]:
        return "launch thread: no calls recorded"
    calls = ", ".join(f"{kind} {_ms(stats)}" for kind, stats in launches["call_ms"].items() if stats)
    return (f"launch thread: {launches['calls']:,} calls, {_number(launches['queued_fraction'], '.0%')} queued before "
            f"the previous returned; hand-off after the previous call's return mean / p50 / p90 / max "
            f"{_ms(launches['handoff_ms'])} / {_ms(launches['handoff_ms'], 'p50')} / "
            f"{_ms(launches['handoff_ms'], 'p90')} / {_ms(launches['handoff_ms'], 'max')} ms; "
            f"late hand-overs {_ms(launches['late_ms'])} ms mean; arguments {_ms(launches['arguments_ms'])} ms mean; "
            f"call ms mean: {calls}")


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ms(stats: dict | None, key: str = "mean") -> str:
    return _number(None if stats is None else stats[key], ".1f")


def format_step_summary(summary: dict) -> str:
    """``summarize_steps``' result as a markdown table and two lines."""
    if not summary["calls"]:
        return "step log: no engine calls recorded"
    lines = [f"step log: {summary['calls']:,} engine calls over {summary['span_s']:.2f} s, "
             f"{summary['generated_tokens']:,} tokens ({summary['tokens_per_s']:,.0f} tok/s), "
             f"{summary['prefill_tokens']:,} prefill tokens",
             "| kind | calls | wall s | share | ms/call mean / p50 / p90 | tok/s | decode steps | ms per step "
             "| decode rows mean | host ms/call mean / p50 | host CPU ms/call | blocked ms/call | dispatched ahead |",
             "|" + "---|" * 13]
    for kind in KINDS:
        k = summary["kinds"][kind]
        if not k["calls"]:
            lines.append(f"| {kind} | 0 |" + " |" * 11)
            continue
        lines.append(
            f"| {kind} | {k['calls']:,} | {k['wall_s']:.2f} | {k['wall_fraction']:.1%} "
            f"| {_ms(k['wall_ms'])} / {_ms(k['wall_ms'], 'p50')} / {_ms(k['wall_ms'], 'p90')} "
            f"| {k['tokens_per_s']:,.0f} | {k['decode_steps']:,} | {_number(k['ms_per_decode_step'], '.2f')} "
            f"| {k['decode_rows_mean']:.1f} | {_ms(k['host_ms'])} / {_ms(k['host_ms'], 'p50')} "
            f"| {k['host_cpu_ms_mean']:.1f} | {_ms(k['blocked_ms'])} | {k['ahead_fraction']:.0%} |")
    histogram = ", ".join(f"{label}: {n}" for label, n in summary["prefill_tokens_per_mixed_call"].items())
    lines.append(f"prefill tokens per mixed call (calls): {histogram}")
    lines.append(f"host busy in step(): {summary['host_s']:.2f} s ({summary['host_fraction']:.1%} of the span); "
                 f"engine loop outside step(): {summary['loop_gap_s']:.2f} s "
                 f"(mean {_ms(summary['loop_gap_ms'])} ms, max {_ms(summary['loop_gap_ms'], 'max')} ms between calls)")
    if "launches" in summary:
        lines.append(format_launch_summary(summary["launches"]))
    return "\n".join(lines)
