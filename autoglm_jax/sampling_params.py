"""User-facing sampling parameters, validated and normalized the way vLLM (v1) does.

Owns: the ``SamplingParams`` dataclass (names, defaults, ranges and normalizations of vLLM's
``vllm/sampling_params.py``). It does not own turning parameters into device arrays
(``autoglm_jax.sampler.SamplingTensors.from_params``) nor finishing requests
(``autoglm_jax.stop_checker``).

Normalizations done in ``__post_init__`` (as vLLM):
  - ``stop``: ``None`` -> ``[]``, ``str`` -> ``[str]``; ``stop_token_ids``: ``None`` -> ``[]``,
    duplicates dropped (order kept).
  - ``seed == -1`` -> ``None``; ``logprobs is True`` / ``prompt_logprobs is True`` -> 1.
  - ``0 < temperature < 0.01`` is raised to 0.01 (with a warning): smaller values overflow in f32.
  - greedy requests (``temperature < 1e-5``) get ``top_p=1, top_k=0, min_p=0`` and must have ``n == 1``.

``logprobs`` / ``prompt_logprobs`` may be ``-1``, meaning the whole vocabulary (vLLM's convention).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5   # temperature below this is greedy (vLLM's _SAMPLING_EPS)
MIN_TEMPERATURE = 1e-2  # positive temperatures below this are raised to it (vLLM's _MAX_TEMP)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_number(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def _require_int(name: str, value: Any) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one request (vLLM names, defaults and semantics).

    n: outputs per prompt. temperature: 0 = greedy. top_p in (0, 1]. top_k: 0 or -1 = off.
    min_p in [0, 1]: drop tokens with probability < min_p * max probability. seed: per-request
    randomness (None = engine-chosen). max_tokens: None = up to the model length. min_tokens:
    EOS / stop_token_ids cannot be generated, and no stop fires, before this many tokens.
    stop: strings that end the output (excluded from the text unless include_stop_str_in_output).
    stop_token_ids: token ids that end the output (stop_reason = the id). ignore_eos: keep going
    after EOS. logprobs / prompt_logprobs: number of top logprobs to return per token (the
    sampled / actual token is always added). presence/frequency_penalty in [-2, 2] act on generated
    tokens; repetition_penalty > 0 acts on prompt and generated tokens (1 = off).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self._normalize()
        self._verify()
        if self.greedy:
            self._set(top_p=1.0, top_k=0, min_p=0.0)
            if self.n != 1:
                raise ValueError(f"n must be 1 when using greedy sampling (temperature=0), got n={self.n}.")

    def _set(self, **changes: Any) -> None:
        for name, value in changes.items():
            object.__setattr__(self, name, value)

    def _normalize(self) -> None:
        if self.seed == -1:
            self._set(seed=None)
        if self.logprobs is True:
            self._set(logprobs=1)
        if self.prompt_logprobs is True:
            self._set(prompt_logprobs=1)
        if self.stop is None:
            self._set(stop=[])
        elif isinstance(self.stop, str):
            self._set(stop=[self.stop])
        elif isinstance(self.stop, (list, tuple)):
            self._set(stop=list(self.stop))
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {self.stop!r}.")
        if self.stop_token_ids is None:
            self._set(stop_token_ids=[])
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self._set(stop_token_ids=list(dict.fromkeys(self.stop_token_ids)))
        else:
            raise ValueError(f"stop_token_ids must be a list of int or None, got {self.stop_token_ids!r}.")
        _require_number("temperature", self.temperature)
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical errors nan or inf in "
                "tensors. We have maxed it out to %s.", self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self._set(temperature=MIN_TEMPERATURE)

    def _verify(self) -> None:
        _require_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        _require_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        _require_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None:
            _require_int("seed", self.seed)
        self._verify_lengths()
        self._verify_stops()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _require_bool(name, getattr(self, name))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _require_int(name, value)
                if value < -1:
                    raise ValueError(f"{name} must be non-negative or -1, got {value}.")
        self._verify_penalties()

    def _verify_lengths(self) -> None:
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        _require_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")

    def _verify_stops(self) -> None:
        for stop_str in self.stop:
            if not isinstance(stop_str, str):
                raise ValueError(f"stop must contain only strings, got {stop_str!r} in {self.stop!r}.")
            if not stop_str:
                raise ValueError(f"stop cannot contain an empty string, got {self.stop!r}.")
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(
                    f"stop_token_ids must contain only non-negative integers, got {self.stop_token_ids!r}.")

    def _verify_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        _require_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        """True when the request samples by argmax (temperature below 1e-5)."""
        return self.temperature < SAMPLING_EPS

    @property
    def output_text_buffer_length(self) -> int:
        """Characters held back while streaming so a stop string is never emitted (vLLM's rule)."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> "SamplingParams":
        """An independent copy (its lists are new lists)."""
        return dataclasses.replace(self, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))
