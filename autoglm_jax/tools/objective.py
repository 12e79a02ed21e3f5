"""The tuning objective: one metric to maximise or minimise, subject to bounds on other metrics.

Owns: turning a trial's result dict (the serving benchmark's metrics, or any metrics) into
feasibility, a violation amount and one number every strategy maximises. Infeasible results rank
below every feasible one, and among themselves by how far they miss their bounds. A bound may be
relative to a baseline trial (``max_vs_baseline``: at most this many times the baseline's value);
``Objective.relative_to(baseline_result)`` turns it into an absolute one once the baseline has run.

    Objective("output_tokens_per_s", "maximize", (Constraint("ttft_p90_ms", max=500.0),))
    Objective("output_tokens_per_s", "maximize", (Constraint("ttft_p90_ms", max_vs_baseline=1.0),))
"""

from __future__ import annotations

import dataclasses
import math

INFEASIBLE_OFFSET = 1e30


@dataclasses.dataclass(frozen=True)
class Constraint:
    metric: str
    max: float | None = None
    min: float | None = None
    max_vs_baseline: float | None = None  # max = this x the baseline trial's value (see Objective.relative_to)

    def __post_init__(self):
        if self.max is None and self.min is None and self.max_vs_baseline is None:
            raise ValueError(f"constraint on {self.metric!r} needs 'max', 'min' or 'max_vs_baseline'")
        if self.max_vs_baseline is not None and (self.max is not None or self.max_vs_baseline <= 0):
            raise ValueError(f"constraint on {self.metric!r}: max_vs_baseline={self.max_vs_baseline} must be > 0 "
                             "and comes instead of 'max'")

    @classmethod
    def from_dict(cls, spec: dict) -> "Constraint":
        if not isinstance(spec, dict) or "metric" not in spec or set(spec) - {"metric", "max", "min", "max_vs_baseline"}:
            raise ValueError(f"a constraint is {{metric, max | min | max_vs_baseline}}; got {spec!r}")
        return cls(spec["metric"], spec.get("max"), spec.get("min"), spec.get("max_vs_baseline"))

    def relative_to(self, baseline_result: dict) -> "Constraint":
        """This constraint with ``max_vs_baseline`` turned into an absolute ``max``."""
        if self.max_vs_baseline is None:
            return self
        value = baseline_result.get(self.metric)
        if value is None or not math.isfinite(value):
            raise ValueError(f"the baseline has no finite {self.metric!r} (got {value!r}) to bound the others by")
        return dataclasses.replace(self, max=self.max_vs_baseline * value, max_vs_baseline=None)

    def violation(self, result: dict) -> float:
        """0 when met; otherwise the relative amount by which it is missed (inf if the metric is missing)."""
        if self.max_vs_baseline is not None:
            raise ValueError(f"constraint on {self.metric!r} is relative to a baseline: use Objective.relative_to")
        value = result.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        miss = 0.0
        if self.max is not None and value > self.max:
            miss += (value - self.max) / max(abs(self.max), 1e-12)
        if self.min is not None and value < self.min:
            miss += (self.min - value) / max(abs(self.min), 1e-12)
        return miss


@dataclasses.dataclass(frozen=True)
class Objective:
    metric: str
    direction: str = "maximize"
    constraints: tuple[Constraint, ...] = ()

    def __post_init__(self):
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"direction={self.direction!r}; choose maximize or minimize")

    @property
    def needs_baseline(self) -> bool:
        return any(c.max_vs_baseline is not None for c in self.constraints)

    def relative_to(self, baseline_result: dict) -> "Objective":
        """The objective with every baseline-relative bound made absolute from ``baseline_result``."""
        return dataclasses.replace(self, constraints=tuple(c.relative_to(baseline_result) for c in self.constraints))

    def violation(self, result: dict) -> float:
        return sum(c.violation(result) for c in self.constraints)

    def is_feasible(self, result: dict) -> bool:
        return self.metric in result and self.violation(result) == 0.0

    def search_value(self, result: dict | None) -> float:
        """What strategies maximise: the (signed) metric when feasible, else far below any feasible value."""
        if result is None or self.metric not in result:
            return -math.inf
        violation = self.violation(result)
        if violation > 0:
            return -INFEASIBLE_OFFSET * (1.0 + min(violation, 1e6))
        value = float(result[self.metric])
        return value if self.direction == "maximize" else -value

    def describe(self) -> str:
        bounds = [f"{c.metric} <= {c.max:g}" for c in self.constraints if c.max is not None]
        bounds += [f"{c.metric} <= {c.max_vs_baseline:g} x the baseline's" for c in self.constraints
                   if c.max_vs_baseline is not None]
        bounds += [f"{c.metric} >= {c.min:g}" for c in self.constraints if c.min is not None]
        return f"{self.direction} {self.metric}" + (f" subject to {', '.join(bounds)}" if bounds else "")

    @classmethod
    def from_dict(cls, spec: dict) -> "Objective":
        unknown = sorted(set(spec) - {"metric", "direction", "constraints"})
        if unknown or "metric" not in spec:
            raise ValueError(f"objective needs 'metric' (+ 'direction', 'constraints'); bad keys {unknown}")
        constraints = tuple(Constraint.from_dict(c) for c in spec.get("constraints", ()))
        return cls(spec["metric"], spec.get("direction", "maximize"), constraints)
