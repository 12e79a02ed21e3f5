"""The serving benchmarks' synthetic workload: random token-id prompts, fixed or mixed lengths, arrival times.

Owns: per-request (prompt token ids, output length) drawn from a seed, so ``serving.py`` (autoglm-jax) and
``hf_serving.py`` (transformers) run exactly the same requests. Extends the autotuner's
``tools.serving_benchmark.Workload`` (fixed lengths, Poisson arrivals) with ``range_ratio``: with r > 0
each request's input and output lengths are drawn independently and uniformly from
[L * (1 - r), L * (1 + r)] (vLLM's ``random`` dataset convention), so the mean stays L. No tokenizer:
ids are drawn from [3, vocab_size).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from autoglm_jax.tools.serving_benchmark import Workload


@dataclasses.dataclass(frozen=True)
class ServingWorkload(Workload):
    range_ratio: float = 0.0  # 0 = every request has input_len / output_len exactly

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio={self.range_ratio} must be in [0, 1)")

    @property
    def label(self) -> str:
        """'fixed 1000/1000' or 'mixed 1000/1000 ±90%' (mean input / mean output tokens)."""
        lengths = f"{self.input_len}/{self.output_len}"
        return f"fixed {lengths}" if self.range_ratio == 0 else f"mixed {lengths} ±{self.range_ratio:.0%}"

    def _lengths(self, mean: int, stream: int) -> np.ndarray:
        """(num_requests,) lengths >= 1 around ``mean``; ``stream`` keeps input and output draws independent."""
        if self.range_ratio == 0:
            return np.full(self.num_requests, mean)
        low = max(1, math.floor(mean * (1 - self.range_ratio)))
        high = max(low, math.ceil(mean * (1 + self.range_ratio)))
        return np.random.default_rng((self.seed, stream)).integers(low, high + 1, self.num_requests)

    def input_lens(self) -> np.ndarray:
        return self._lengths(self.input_len, 1)

    def output_lens(self) -> np.ndarray:
        return self._lengths(self.output_len, 2)

    def max_total_len(self) -> int:
        """Longest prompt + output of the workload (the engine's max_sequence_length must cover it)."""
        return int(np.max(self.input_lens() + self.output_lens()))

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """[(prompt token ids, output tokens)] per request; fixed lengths give ``Workload.prompts``' ids."""
        rng = np.random.default_rng(self.seed)
        return [(rng.integers(3, vocab_size, int(n_in)).tolist(), int(n_out))
                for n_in, n_out in zip(self.input_lens(), self.output_lens())]


def named_workloads(names: list[str], num_requests: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int) -> list[ServingWorkload]:
    """Offline workloads for the names given on the command line: "fixed" and/or "mixed" (``range_ratio``)."""
    ratios = {"fixed": 0.0, "mixed": range_ratio}
    if not names or set(names) - set(ratios):
        raise ValueError(f"workloads {','.join(names)!r}: choose from {', '.join(ratios)}")
    return [ServingWorkload(num_requests, input_len, output_len, None, seed, range_ratio=ratios[name])
            for name in names]
