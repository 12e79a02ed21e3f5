"""The autotuning loop: suggest, evaluate, log, repeat — and the results it writes.

Owns: running up to ``max_trials`` trials (counting those already in the log, so a re-run resumes),
turning an evaluation's exception into a failed trial, picking the best feasible trial, and writing
the results table (CSV) and the best configuration (a JSON file of EngineConfig settings that
``autoglm serve --config`` / ``AutoGLMEngine(json.load(...))`` accept). The evaluation itself is a
callable ``settings -> metrics`` (the serving benchmark, or a synthetic function in tests).
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
    best: Trial | None  # best feasible trial, None if none was feasible


def best_trial(trials: list[Trial]) -> Trial | None:
    feasible = [t for t in trials if t.status == "ok" and t.feasible]
    return max(feasible, key=lambda t: t.value, default=None)


def autotune(space: SearchSpace, objective: Objective, evaluate: Callable[[dict[str, Any]], dict[str, Any]], *,
             strategy: str, max_trials: int, log_path: str, seed: int = 0,
             on_trial: Callable[[Trial], None] | None = None) -> TuneResult:
    """Runs trials until ``max_trials`` are logged or the strategy is exhausted.

    ``evaluate`` gets ``{**space.fixed, **params}``; an exception fails that trial (logged, not raised),
    except KeyboardInterrupt, which stops the run with every finished trial already on disk.
    """
    if max_trials < 1:
        raise ValueError(f"max_trials={max_trials} must be >= 1")
    header = {"space": space.to_dict(), "objective": dataclasses.asdict(objective), "strategy": strategy,
              "seed": seed}
    trial_log = TrialLog(log_path, header)
    trials = trial_log.load()
    if trials:
        log.info("resuming %s: %d trials done", log_path, len(trials))
    chooser = make_strategy(strategy, space, seed)
    while len(trials) < max_trials:
        params = chooser.suggest(trials)
        if params is None:
            break
        trial = _run_trial(len(trials), params, space, objective, evaluate)
        trial_log.append(trial)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
    return TuneResult(trials, best_trial(trials))


def _run_trial(index: int, params: dict, space: SearchSpace, objective: Objective, evaluate) -> Trial:
    start = time.perf_counter()
    try:
        result = evaluate({**space.fixed, **params})
    except Exception as error:  # a bad configuration (OOM, invalid setting) is a failed trial
        log.warning("trial %d %s failed: %s", index, params, error)
        return Trial(index, params, "failed", None, objective.search_value(None), False,
                     time.perf_counter() - start, "".join(traceback.format_exception_only(error)).strip())
    return Trial(index, params, "ok", result, objective.search_value(result), objective.is_feasible(result),
                 time.perf_counter() - start)


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
