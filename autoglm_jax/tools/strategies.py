"""Search strategies of the autotuner: ``grid``, ``random`` and ``bayesian`` (Optuna's TPE).

Owns: choosing the next trial's parameters from the trials so far. Every strategy is a pure function
of (search space, seed, past trials), so a resumed run continues exactly where it stopped:
  - grid: the next combination (first parameter slowest) not yet tried;
  - random: uniform (log-uniform for ``log`` ranges) draws from a generator seeded by (seed, trial index);
  - bayesian: Optuna's TPE sampler, given every past trial's value (``Objective.search_value``),
    seeded by (seed, trial index). Failed trials are told to Optuna as failed; trials outside the space
    (a baseline such as the engine defaults may be) are not told.
``suggest`` returns None when the strategy has nothing left (a finished grid).
"""

from __future__ import annotations

import math
import random
from typing import Any

from autoglm_jax.tools.search_space import Parameter, SearchSpace
from autoglm_jax.tools.trial_log import Trial

STRATEGIES = ("grid", "random", "bayesian")


class GridStrategy:
    def __init__(self, space: SearchSpace, seed: int = 0):
        self.points = space.grid()

    def suggest(self, history: list[Trial]) -> dict[str, Any] | None:
        tried = [t.params for t in history]
        return next((p for p in self.points if p not in tried), None)


def _draw(rng: random.Random, p: Parameter):
    if p.is_categorical:
        return rng.choice(p.values)
    if p.log:
        value = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
    else:
        value = rng.uniform(p.low, p.high)
    return min(max(int(round(value)), int(p.low)), int(p.high)) if p.type == "int" else value


class RandomStrategy:
    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space, self.seed = space, seed

    def suggest(self, history: list[Trial]) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{len(history)}")
        return {p.name: _draw(rng, p) for p in self.space.parameters}


class BayesianStrategy:
    """TPE over the space; the study is rebuilt from the history at each suggestion (cheap for the
    hundreds of trials a serving benchmark allows, and what makes resuming exact)."""

    def __init__(self, space: SearchSpace, seed: int = 0, n_startup_trials: int = 8):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.space, self.seed, self.n_startup_trials = optuna, space, seed, n_startup_trials
        self.distributions = {p.name: self._distribution(p) for p in space.parameters}

    def _distribution(self, p: Parameter):
        d = self.optuna.distributions
        if p.is_categorical:
            return d.CategoricalDistribution(list(p.values))
        if p.type == "int":
            return d.IntDistribution(int(p.low), int(p.high), log=p.log)
        return d.FloatDistribution(float(p.low), float(p.high), log=p.log)

    def suggest(self, history: list[Trial]) -> dict[str, Any]:
        optuna = self.optuna
        sampler = optuna.samplers.TPESampler(seed=hash((self.seed, len(history))) % 2**31,
                                             n_startup_trials=self.n_startup_trials)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for trial in history:
            if not self.space.contains(trial.params):
                continue
            ok = trial.status == "ok" and math.isfinite(trial.value)
            study.add_trial(optuna.trial.create_trial(
                params=trial.params, distributions=self.distributions, value=trial.value if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL))
        return dict(study.ask(self.distributions).params)


def make_strategy(name: str, space: SearchSpace, seed: int = 0):
    classes = {"grid": GridStrategy, "random": RandomStrategy, "bayesian": BayesianStrategy}
    if name not in classes:
        raise ValueError(f"strategy={name!r}; choose one of {STRATEGIES}")
    return classes[name](space, seed)
