"""The bucket ladder: the only shapes the jitted steps ever see.

Owns: rounding a step's sizes up to a precompiled shape. Ladder (documented, all compiled by warmup):
  - decode calls: batch rows B = 1 (``single_row_decode``), then powers of two from
    ``MIN_MULTI_ROW_DECODE`` (8) up to max_batch_size (T = B). A decode step reads every weight once
    whatever its rows, so 2-7 rows padded to 8 cost what 8 do (padding rows are skipped by the attention
    kernel); dropping the 2- and 4-row programs saves two of the ladder's compilations at every cold
    start (13 -> 11 programs at max_batch_size 64, the start-up target of issue 5). The runner drops the
    1-row program too on a GPU: there the 8-row program runs even one sequence faster (H100, GLM-4-9B,
    1k context: 8 rows 7.56 ms a step, 1 row 8.38 ms; XLA's GEMMs for one row are split-K GEMVs with
    extra reduction kernels) and the 1-row program was the ladder's slowest compile;
  - mixed/prefill steps: flat tokens T in powers of two from 16 up to max_num_batched_tokens, with
    B = min(T, max_batch_size) rows;
  - the page-table width is fixed at ceil(max_sequence_length / page_size) (kernels loop only over a
    sequence's real pages, so a wider table costs nothing there).
"""

from __future__ import annotations

import dataclasses
import functools

MIN_TOKEN_BUCKET = 16
MIN_MULTI_ROW_DECODE = 8


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    out, value = [], low
    while value < high:
        out.append(value)
        value *= 2
    out.append(high)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class BucketLadder:
    max_batch_size: int
    max_num_batched_tokens: int
    single_row_decode: bool = True  # a 1-row decode program below the multi-row ones (module docstring)

    @functools.cached_property  # the ladders are read on every step: built once per instance
    def decode_batches(self) -> tuple[int, ...]:
        multi_row = _powers_of_two(min(MIN_MULTI_ROW_DECODE, self.max_batch_size), self.max_batch_size)
        return tuple(sorted({1, *multi_row})) if self.single_row_decode else multi_row

    @functools.cached_property
    def token_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(min(MIN_TOKEN_BUCKET, self.max_num_batched_tokens), self.max_num_batched_tokens)

    def rows_for_tokens(self, token_bucket: int) -> int:
        return min(token_bucket, self.max_batch_size)

    def decode_batch(self, num_rows: int) -> int:
        return _round_up(num_rows, self.decode_batches)

    def token_bucket(self, num_tokens: int) -> int:
        return _round_up(num_tokens, self.token_buckets)


def _round_up(value: int, ladder: tuple[int, ...]) -> int:
    for bucket in ladder:
        if value <= bucket:
            return bucket
    raise ValueError(f"{value} exceeds the largest bucket {ladder[-1]}")
