"""The autotuning loop: suggest, evaluate, log, repeat — and the results it writes.

Owns: running up to ``max_trials`` trials (counting those already in the log, so a re-run resumes),
an optional baseline trial run first (e.g. the engine defaults, so the result can say how much the
best beats them; its result also resolves baseline-relative bounds of the objective), an optional
time budget (no trial starts that would likely end past it), turning an evaluation's exception into a
failed trial, picking the best feasible trial, and writing the results table (CSV) and the best
configuration (a JSON file of EngineConfig settings that ``autoglm serve --config`` /
``AutoGLMEngine(json.load(...))`` accept). The evaluation itself is a callable ``settings -> metrics``
(the serving benchmark, or a synthetic function in tests).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
import traceback
from typing import Any, Callable

from autoglm_jax.tools.objective import Objective
from autoglm_jax.tools.search_space import SearchSpace
from autoglm_jax.tools.strategies import make_strategy
from autoglm_jax.tools.trial_log import Trial, TrialLog

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    trials: list[Trial]
    best: Trial | None       # best feasible trial (the baseline included), None if none was feasible
    objective: Objective     # with baseline-relative bounds resolved
    baseline: Trial | None = None  # trial 0 when a baseline was given
    # "max_trials" | "exhausted" (the strategy has nothing left) | "time_budget" | "running" (a snapshot)
    stop_reason: str = "max_trials"


def best_trial(trials: list[Trial]) -> Trial | None:
    feasible = [t for t in trials if t.status == "ok" and t.feasible]
    return max(feasible, key=lambda t: t.value, default=None)


def autotune(space: SearchSpace, objective: Objective, evaluate: Callable[[dict[str, Any]], dict[str, Any]], *,
             strategy: str, max_trials: int, log_path: str, seed: int = 0, baseline: dict[str, Any] | None = None,
             time_budget_s: float | None = None, on_trial: Callable[[TuneResult], None] | None = None) -> TuneResult:
    """Runs trials until ``max_trials`` are logged, the strategy is exhausted or the time budget is spent.

    ``evaluate`` gets ``{**space.fixed, **params}``; an exception fails that trial (logged, not raised),
    except KeyboardInterrupt, which stops the run with every finished trial already on disk.
    ``baseline``: parameter values evaluated first, as trial 0 (counted in ``max_trials``; they may lie
    outside the space). Required when the objective has baseline-relative bounds; if it then fails,
    RuntimeError (and it is not logged, so a re-run tries it again).
    ``time_budget_s``: seconds from this call; a trial starts only if the mean time of the trials this
    call ran says it ends within them (the first trial of the call always runs).
    ``on_trial``: called after each trial with the results so far (``stop_reason="running"``).
    """
    if max_trials < 1:
        raise ValueError(f"max_trials={max_trials} must be >= 1")
    if objective.needs_baseline and baseline is None:
        raise ValueError(f"{objective.describe()}: bounds relative to the baseline need a baseline trial")
    if baseline is not None and set(baseline) != set(space.names):
        raise ValueError(f"the baseline sets {sorted(baseline)}; it must set exactly the parameters {sorted(space.names)}")
    start = time.monotonic()
    header = {"space": space.to_dict(), "objective": dataclasses.asdict(objective), "strategy": strategy,
              "seed": seed, **({"baseline": baseline} if baseline is not None else {})}
    trial_log = TrialLog(log_path, header)
    trials = trial_log.load()
    if trials:
        log.info("resuming %s: %d trials done", log_path, len(trials))
    session_seconds: list[float] = []  # of the trials run by this call

    def record(trial: Trial) -> None:
        trial_log.append(trial)
        trials.append(trial)
        session_seconds.append(trial.seconds)
        if on_trial is not None:
            on_trial(_result(trials, objective, baseline, "running"))

    if baseline is not None and not trials:
        outcome = _evaluate(baseline, space, evaluate)
        if objective.needs_baseline and outcome.result is None:
            raise RuntimeError(f"the baseline trial {baseline} failed, so {objective.describe()} has no bound: "
                               f"{outcome.error}")
        objective = objective.relative_to(outcome.result) if objective.needs_baseline else objective
        record(_trial(0, baseline, outcome, objective))
    elif baseline is not None:
        objective = objective.relative_to(trials[0].result) if objective.needs_baseline else objective
    chooser = make_strategy(strategy, space, seed)
    stop_reason = "max_trials"
    while len(trials) < max_trials:
        if time_budget_s is not None and session_seconds and (
                time.monotonic() - start + sum(session_seconds) / len(session_seconds) > time_budget_s):
            stop_reason = "time_budget"
            log.info("time budget of %.0f s reached after %d trials", time_budget_s, len(trials))
            break
        params = chooser.suggest(trials)
        if params is None:
            stop_reason = "exhausted"
            break
        record(_trial(len(trials), params, _evaluate(params, space, evaluate), objective))
    return _result(trials, objective, baseline, stop_reason)


def _result(trials: list[Trial], objective: Objective, baseline: dict | None, stop_reason: str) -> TuneResult:
    return TuneResult(list(trials), best_trial(trials), objective, trials[0] if baseline is not None else None,
                      stop_reason)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    result: dict[str, Any] | None  # None when the evaluation raised
    seconds: float
    error: str | None = None


def _evaluate(params: dict, space: SearchSpace, evaluate) -> _Outcome:
    start = time.perf_counter()
    try:
        result = evaluate({**space.fixed, **params})
    except Exception as error:  # a bad configuration (OOM, invalid setting) is a failed trial
        log.warning("trial %s failed: %s", params, error)
        return _Outcome(None, time.perf_counter() - start, "".join(traceback.format_exception_only(error)).strip())
    return _Outcome(result, time.perf_counter() - start)


def _trial(index: int, params: dict, outcome: _Outcome, objective: Objective) -> Trial:
    if outcome.result is None:
        return Trial(index, params, "failed", None, objective.search_value(None), False, outcome.seconds, outcome.error)
    return Trial(index, params, "ok", outcome.result, objective.search_value(outcome.result),
                 objective.is_feasible(outcome.result), outcome.seconds)


def write_csv(trials: list[Trial], path: str, metrics: tuple[str, ...] = ()) -> None:
    """One row per trial: index, status, feasible, the parameters, then ``metrics`` (or all result keys)."""
    param_names = list(dict.fromkeys(k for t in trials for k in t.params))
    metric_names = list(metrics) or list(dict.fromkeys(
        k for t in trials if t.result for k, v in t.result.items() if isinstance(v, (int, float))))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", "feasible", *param_names, *metric_names, "seconds"])
        for t in trials:
            result = t.result or {}
            writer.writerow([t.index, t.status, t.feasible, *(t.params.get(n) for n in param_names),
                             *(result.get(n) for n in metric_names), f"{t.seconds:.1f}"])


def write_best_config(best: Trial, fixed: dict[str, Any], path: str) -> dict[str, Any]:
    """The best trial's settings (fixed ones included) as a JSON object; returns it."""
    settings = {**fixed, **best.params}
    with open(path, "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
        f.write("\n")
    return settings
