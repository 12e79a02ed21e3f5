"""The autotuner's search space: named parameters with their values or ranges, plus fixed settings.

Owns: reading a space from a dict / JSON / YAML file and validating it. A parameter is either
categorical (``values: [...]``) or a range (``low``, ``high``, ``type: int | float``, optional
``log: true`` and, for grids over int ranges, ``step``). ``fixed`` settings go to every trial
unchanged. File layout (JSON or YAML)::

    parameters:
      max_batch_size: {values: [8, 16, 32, 64]}
      prefill_ratio: {low: 0.5, high: 1.0}
      max_num_batched_tokens: {low: 256, high: 2048, type: int, log: true}
    fixed: {model: glm-4-9b-chat-hf, max_sequence_length: 2048}
    objective: {metric: output_tokens_per_s, direction: maximize,
                constraints: [{metric: ttft_p90_ms, max: 500}]}
    benchmark: {num_requests: 200, input_len: 256, output_len: 128, request_rate: 8}
    baseline: defaults      # or {max_batch_size: 32, prefill_ratio: 0.8, ...}: run first, as trial 0

``objective`` and ``benchmark`` are read by ``tools.objective`` and ``tools.serving_benchmark``,
``baseline`` by ``autoglm autotune`` (``tools.tuner`` runs it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    values: tuple | None = None        # categorical
    low: float | None = None           # range
    high: float | None = None
    type: str = "float"                # "int" | "float" (ranges only)
    log: bool = False
    step: int = 1                      # int ranges: grid step

    def __post_init__(self):
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError(f"parameter {self.name!r}: give either 'values' or both 'low' and 'high'")
        if self.values is not None and not self.values:
            raise ValueError(f"parameter {self.name!r}: 'values' is empty")
        if self.values is None:
            if self.type not in ("int", "float"):
                raise ValueError(f"parameter {self.name!r}: type={self.type!r}; choose int or float")
            if not self.low <= self.high:
                raise ValueError(f"parameter {self.name!r}: low={self.low} > high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"parameter {self.name!r}: log=True needs low > 0, got {self.low}")
            if self.step < 1:
                raise ValueError(f"parameter {self.name!r}: step={self.step} must be >= 1")

    @property
    def is_categorical(self) -> bool:
        return self.values is not None

    def grid(self) -> tuple:
        """Every value a grid visits; float ranges have no grid."""
        if self.values is not None:
            return self.values
        if self.type == "int":
            return tuple(range(int(self.low), int(self.high) + 1, self.step))
        raise ValueError(f"parameter {self.name!r} is a float range: a grid needs 'values'")

    def contains(self, value) -> bool:
        if self.values is not None:
            return value in self.values
        return self.low <= value <= self.high


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.parameters:
            raise ValueError("the search space has no parameters")
        names = [p.name for p in self.parameters]
        duplicated = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(self.fixed)))
        if duplicated:
            raise ValueError(f"parameters {duplicated} appear twice (or also in 'fixed')")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def grid(self) -> list[dict[str, Any]]:
        """The Cartesian product of every parameter's grid, first parameter slowest."""
        return [dict(zip(self.names, combo)) for combo in itertools.product(*(p.grid() for p in self.parameters))]

    def contains(self, params: dict[str, Any]) -> bool:
        """Whether ``params`` names exactly this space's parameters, each with a value inside its range."""
        return set(params) == set(self.names) and all(p.contains(params[p.name]) for p in self.parameters)

    def check_names(self, allowed: set[str]) -> None:
        unknown = sorted((set(self.names) | set(self.fixed)) - allowed)
        if unknown:
            raise ValueError(f"unknown settings {unknown} in the search space; accepted: {sorted(allowed)}")

    def to_dict(self) -> dict:
        params = {}
        for p in self.parameters:
            params[p.name] = ({"values": list(p.values)} if p.is_categorical else
                              {"low": p.low, "high": p.high, "type": p.type, "log": p.log, "step": p.step})
        return {"parameters": params, "fixed": dict(self.fixed)}

    @classmethod
    def from_dict(cls, spec: dict) -> "SearchSpace":
        if "parameters" not in spec or not isinstance(spec["parameters"], dict):
            raise ValueError(f"a search space needs a 'parameters' mapping; got keys {sorted(spec)}")
        params = []
        for name, p in spec["parameters"].items():
            if not isinstance(p, dict):
                raise ValueError(f"parameter {name!r}: expected a mapping, got {p!r}")
            unknown = sorted(set(p) - {"values", "low", "high", "type", "log", "step"})
            if unknown:
                raise ValueError(f"parameter {name!r}: unknown keys {unknown}")
            values = tuple(p["values"]) if "values" in p else None
            params.append(Parameter(name, values, p.get("low"), p.get("high"), p.get("type", "float"),
                                    bool(p.get("log", False)), int(p.get("step", 1))))
        return cls(tuple(params), dict(spec.get("fixed") or {}))


def read_spec_file(path: str | os.PathLike) -> dict:
    """A JSON or YAML file (by extension: .json, .yaml, .yml) as a dict."""
    path = os.fspath(path)
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            spec = yaml.safe_load(f)
        elif path.endswith(".json"):
            spec = json.load(f)
        else:
            raise ValueError(f"{path}: search space files end in .json, .yaml or .yml")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(spec).__name__}")
    return spec
