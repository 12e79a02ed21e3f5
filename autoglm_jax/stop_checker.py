"""Host-side finishing of one output sequence: EOS, stop tokens, stop strings, lengths; text to emit.

Owns: ``StopChecker``, fed one generated token at a time (its id and the text delta the
incremental detokenizer produced for it); it decides whether the sequence finished, why, and which
text may be emitted now. It does not own detokenization (the tokenizer module), sampling, or
freeing the request (the engine).

Semantics follow vLLM v1 (``v1/core/sched/utils.py::check_stop`` for tokens and
``v1/engine/detokenizer.py`` for strings):
  - Before ``min_tokens`` tokens exist nothing stops except the model length; stop strings are only
    looked for once more than ``min_tokens`` tokens exist.
  - EOS (the first of ``eos_token_ids``) -> "stop", stop_reason None. The other eos ids (a
    generation config's extra ones) act as stop_token_ids, as vLLM adds them there. ``ignore_eos``
    disables all of them.
  - ``stop_token_ids`` -> "stop", stop_reason = the id. The stop token's text is dropped unless
    ``include_stop_str_in_output``.
  - ``max_tokens`` / model length -> "length".
  - Stop strings: searched only where new text could complete one (so one spanning several tokens
    is found); the first of ``params.stop`` (list order) found wins; the text is cut before it, or
    after it with ``include_stop_str_in_output``; anything after it is dropped. A stop string
    overrides a token-based finish of the same step.
  - Streaming hold-back: while running, the last ``max(len(stop)) - 1`` characters are not emitted
    (vLLM's ``stop_buffer_length``) when stop strings exist and are excluded from the output, so a
    stop string is never streamed and emitted text is never retracted. The rest comes on finish.

Finish precedence for a token: model length, min_tokens gate, EOS, stop token, max_tokens; then
the stop-string check. (vLLM checks the model length after the min_tokens gate; checking it first
only differs where generation would otherwise run past the model length.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from autoglm_jax.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class StopResult:
    """What one token did. text_delta: text that may be emitted now (possibly empty)."""

    text_delta: str
    finish_reason: str | None = None   # None while running, "stop" or "length"
    stop_reason: int | str | None = None  # stop token id or stop string; None for EOS / length

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def find_stop_string(
    output_text: str, new_char_count: int, stop: Sequence[str], include_in_output: bool
) -> tuple[str, int] | None:
    """vLLM's ``check_stop_strings``: (stop string, length to cut the text to or -1) or None.

    Only a match that ends inside the last ``new_char_count`` characters is new, so each stop
    string is searched from ``len(stop_str) - 1`` characters before the new text.
    """
    if not new_char_count or not stop:
        return None
    for stop_str in stop:
        start = max(0, len(output_text) + 1 - new_char_count - len(stop_str))
        index = output_text.find(stop_str, start)
        if index == -1:
            continue
        if include_in_output:
            index += len(stop_str)
            if index >= len(output_text):
                return stop_str, -1
        return stop_str, index
    return None


class StopChecker:
    """Finish state and emitted text of one output sequence.

    params: the request's SamplingParams; eos_token_ids: the model's EOS ids, primary first;
    prompt_len / max_model_len: for the model-length cap (None = no cap from the model).
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        *,
        prompt_len: int = 0,
        max_model_len: int | None = None,
    ):
        self.params = params
        eos = list(eos_token_ids)
        self._eos_token_id = eos[0] if eos and not params.ignore_eos else None
        extra_eos = eos[1:] if not params.ignore_eos else []
        self._stop_token_ids = {*params.stop_token_ids, *extra_eos} - {self._eos_token_id}
        self._prompt_len = prompt_len
        self._max_model_len = max_model_len
        # For ``num_tokens_to_finish``: the output count at which a length rule ends the sequence (the model
        # length, or max_tokens once min_tokens are reached), and every id that stops it after min_tokens.
        limits = [max_model_len - prompt_len] if max_model_len is not None else []
        if params.max_tokens is not None:
            limits.append(max(params.max_tokens, params.min_tokens))
        self._length_limit = min(limits) if limits else None
        self._stopping_ids = self._stop_token_ids | ({self._eos_token_id} if self._eos_token_id is not None else set())
        self._buffer_length = params.output_text_buffer_length
        self._output_text = ""
        self._emitted_chars = 0
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_text(self) -> str:
        """All text so far, trimmed at a stop string (may include not-yet-emitted characters)."""
        return self._output_text

    def update(self, token_id: int, text_delta: str) -> StopResult:
        """Account one generated token and its detokenized text; return what to emit and why it ended."""
        if self.finished:
            raise RuntimeError(f"update(token_id={token_id}) after the sequence finished ({self.finish_reason})")
        self.num_output_tokens += 1
        self.finish_reason, self.stop_reason = self._check_token(token_id)
        token_stopped = self.finish_reason == "stop"
        if not token_stopped or self.params.include_stop_str_in_output:
            self._output_text += text_delta
            self._check_stop_strings(len(text_delta))
        return StopResult(self._next_delta(), self.finish_reason, self.stop_reason)

    def update_many(self, token_ids: Sequence[int], text_deltas: Sequence[str] | None = None) -> int:
        """``update`` of each token in order until one finishes the sequence; returns how many were taken
        (that one included). ``text_deltas[i]``: token i's detokenized text (None: no text). The finish
        state and text equal ``update``'s one token at a time; the per-token emitted deltas are not
        returned (``output_text`` holds the text). Without stop strings no per-token work is done but
        finding the finishing token."""
        if self.params.stop:  # text decides: one token at a time
            for i, token_id in enumerate(token_ids):
                if self.update(token_id, text_deltas[i] if text_deltas is not None else "").finished:
                    return i + 1
            return len(token_ids)
        if self.finished:
            raise RuntimeError(f"update_many() after the sequence finished ({self.finish_reason})")
        count = self.num_tokens_to_finish(token_ids)
        self.num_output_tokens += count
        self.finish_reason, self.stop_reason = self._check_token(token_ids[count - 1]) if count else (None, None)
        if text_deltas is not None:
            kept = count - (self.finish_reason == "stop" and not self.params.include_stop_str_in_output)
            self._output_text += "".join(text_deltas[:kept])
        self._next_delta()
        return count

    def num_tokens_to_finish(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids`` (the next generated tokens) ``update`` would take: up to and including
        the first that finishes the sequence by a token rule (model length, EOS, stop token id,
        max_tokens), all of them when none does. Stop strings are not looked at."""
        done = self.num_output_tokens  # token i is output token done + i + 1
        end = len(token_ids)  # index of the first finishing token, len = none
        if self._length_limit is not None and self._length_limit - done - 1 < end:
            end = max(0, self._length_limit - done - 1)
        stops = self._stopping_ids
        if stops:
            gate = max(0, self.params.min_tokens - done - 1)  # no token stops before min_tokens
            if gate < end and not stops.isdisjoint(token_ids[gate:end]):
                end = next(i for i in range(gate, end) if token_ids[i] in stops)
        return min(end + 1, len(token_ids))

    def _check_token(self, token_id: int) -> tuple[str | None, int | None]:
        p = self.params
        if self._max_model_len is not None and self._prompt_len + self.num_output_tokens >= self._max_model_len:
            return "length", None
        if self.num_output_tokens < p.min_tokens:
            return None, None
        if token_id == self._eos_token_id:
            return "stop", None
        if token_id in self._stop_token_ids:
            return "stop", token_id
        if p.max_tokens is not None and self.num_output_tokens >= p.max_tokens:
            return "length", None
        return None, None

    def _check_stop_strings(self, new_char_count: int) -> None:
        p = self.params
        if not p.stop or self.num_output_tokens <= p.min_tokens:
            return
        match = find_stop_string(self._output_text, new_char_count, p.stop, p.include_stop_str_in_output)
        if match is None:
            return
        stop_str, truncate_to = match
        if truncate_to != -1:
            self._output_text = self._output_text[:truncate_to]
        self.finish_reason, self.stop_reason = "stop", stop_str

    def _next_delta(self) -> str:
        held = 0 if self.finished else self._buffer_length
        end = len(self._output_text) - held
        if end <= self._emitted_chars:
            return ""
        delta = self._output_text[self._emitted_chars : end]
        self._emitted_chars = end
        return delta
