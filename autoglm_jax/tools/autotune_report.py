"""The autotuner's report for humans: a markdown table of the trials and the best-vs-baseline line.

Owns: formatting a ``TuneResult`` (``tools.tuner``) as markdown, ready to paste into RESULTS.md —
one row per trial (parameters, the objective's metric, its constrained metrics and a few latency
percentiles), the baseline and best rows marked, then one sentence comparing the best trial with the
baseline (the engine defaults) under the resolved bounds. It computes nothing new.

    | trial | max_batch_size | ... | output_tokens_per_s | ttft_p90_ms | ... | feasible | seconds |
    Best (trial 7) beats the default (trial 0): output_tokens_per_s 9120 vs 5310 (+71.8%) at ttft_p90_ms <= 812.3 ...
"""

from __future__ import annotations

import math

from autoglm_jax.tools.trial_log import Trial
from autoglm_jax.tools.tuner import TuneResult

EXTRA_METRICS = ("ttft_p50_ms", "tpot_p50_ms", "e2e_p90_ms")  # shown after the objective's own metrics


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def report_metrics(result: TuneResult) -> tuple[str, ...]:
    """The objective's metric, then the constrained metrics, then ``EXTRA_METRICS`` (no repeats)."""
    names = (result.objective.metric, *(c.metric for c in result.objective.constraints), *EXTRA_METRICS)
    return tuple(dict.fromkeys(names))


def trials_table(result: TuneResult) -> str:
    """A markdown table, one row per trial; the baseline row says "(default)", the best row is bold."""
    params = list(dict.fromkeys(k for t in result.trials for k in t.params))
    metrics = report_metrics(result)
    lines = ["| trial | " + " | ".join((*params, *metrics)) + " | feasible | seconds |",
             "|" + "---|" * (len(params) + len(metrics) + 3)]
    for t in result.trials:
        name = f"{t.index}" + (" (default)" if result.baseline is not None and t.index == result.baseline.index else "")
        status = "yes" if t.feasible else "no" if t.status == "ok" else f"failed: {_short(t.error)}"
        cells = [name, *(str(t.params.get(p, "–")) for p in params),
                 *(_number((t.result or {}).get(m)) for m in metrics), status, f"{t.seconds:.0f}"]
        if result.best is not None and t.index == result.best.index:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(error: str | None, limit: int = 80) -> str:
    text = (error or "").splitlines()[-1] if error else "?"
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comparison(result: TuneResult) -> str:
    """One sentence: how the best trial compares with the baseline under the (resolved) bounds."""
    objective, best, baseline = result.objective, result.best, result.baseline
    bounds = objective.describe().partition(" subject to ")[2] or "no bound"
    if best is None:
        return f"No feasible trial at {bounds}: relax the bounds or widen the space."
    if baseline is None:
        return f"Best: trial {best.index}, {objective.metric} {_number(best.result[objective.metric])} at {bounds}."
    if best.index == baseline.index:
        return f"No trial beat the default (trial {baseline.index}) at {bounds}."
    if baseline.result is None:
        return (f"Best: trial {best.index}, {objective.metric} {_number(best.result[objective.metric])} at {bounds}; "
                f"the default (trial {baseline.index}) failed.")
    best_value, base_value = best.result[objective.metric], baseline.result[objective.metric]
    change = 100.0 * (best_value - base_value) / abs(base_value) if base_value else math.inf
    constrained = ", ".join(f"{c.metric} {_number(best.result.get(c.metric))} vs {_number(baseline.result.get(c.metric))}"
                            for c in objective.constraints)
    verdict = "beats the default" if baseline.feasible else "is feasible, the default is not"
    return (f"Best (trial {best.index}) {verdict} (trial {baseline.index}): {objective.metric} "
            f"{_number(best_value)} vs {_number(base_value)} ({change:+.1f}%) at {bounds}"
            + (f" ({constrained})" if constrained else "") + ".")


def summary_markdown(result: TuneResult, *, context: list[str] = ()) -> str:
    """``context`` lines (device, workload, fixed settings), the table and the comparison, as markdown."""
    stopped = {"max_trials": "", "exhausted": " (the strategy ran out of points)",
               "time_budget": " (stopped by the time budget)", "running": " so far"}[result.stop_reason]
    head = [f"Autotune: {result.objective.describe()}; {len(result.trials)} trials{stopped}.", *context]
    return "\n".join(head) + "\n\n" + trials_table(result) + "\n\n" + comparison(result) + "\n"


def trial_line(trial: Trial, metric: str) -> str:
    """One progress line for a finished trial."""
    value = (trial.result or {}).get(metric)
    state = "feasible" if trial.feasible else "infeasible" if trial.status == "ok" else f"FAILED ({_short(trial.error)})"
    return f"trial {trial.index}: {trial.params} -> {metric}={_number(value)} {state} ({trial.seconds:.0f} s)"
