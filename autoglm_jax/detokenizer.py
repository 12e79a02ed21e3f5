"""Streaming token ids -> text deltas, one request at a time (vLLM's incremental detokenization).

Owns: the two offsets that make each step O(1): ``prefix_offset`` (start of a short window of
already-emitted tokens, decoded again only for context: byte-level merges, SentencePiece's leading-space
rule) and ``read_offset`` (first token whose text is not emitted yet). Each step decodes
``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:]`` and emits the difference, unless the
new text ends in U+FFFD: a character whose bytes span several tokens is held back until complete.

Invariant: the deltas of ``add`` and ``flush`` concatenated equal ``tokenizer.decode(ids)`` of the
generated ids (the text after the prompt, when a prompt is given for context).

Does not own: stop strings or eos handling (the engine's), the tokenizer itself (``tokenizer.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept before the first generated token as decoding context (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    ``spaces_between_special_tokens`` is accepted for vLLM's ``SamplingParams`` parity: with a
    ``tokenizers`` backend (vLLM's fast path) decode never puts spaces around added tokens, so both
    values give the same text.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        self._num_context = len(context)
        # Emitted text so far is decode(ids[prefix_offset:read_offset]) minus the context's own text.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """The generated ids fed so far (prompt context excluded)."""
        return self._ids[self._num_context:]

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feeds one or several generated ids; returns the newly complete text ("" while held back)."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        return self._emit(final=False)

    def add_each(self, token_ids: Sequence[int]) -> list[str]:
        """``add`` of each id in turn (the same windows and hold-backs); their deltas, one per id."""
        deltas = []
        for token_id in token_ids:
            self._ids.append(token_id)
            deltas.append(self._emit(final=False))
        return deltas

    def flush(self) -> str:
        """Emits what is held back (a trailing U+FFFD that the tokens really decode to) at the stream's end."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing new yet (skipped special token), or an incomplete character
        delta = full_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
