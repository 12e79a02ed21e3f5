"""The bucket ladder (``engine.buckets``): the decode and token buckets it compiles, the rounding of a
step onto them, and an engine without the 1-row decode program (the GPU default) serving one sequence
through the 8-row program with the same tokens and no trace beyond the ladder."""

from __future__ import annotations

import numpy as np

from autoglm_jax.engine import runner as runner_module
from autoglm_jax.engine.buckets import BucketLadder
from autoglm_jax.llm import LLM
from autoglm_jax.sampling_params import SamplingParams


def test_decode_and_token_buckets():
    ladder = BucketLadder(64, 2048)
    assert ladder.decode_batches == (1, 8, 16, 32, 64)
    assert ladder.token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert [ladder.decode_batch(n) for n in (1, 2, 8, 9, 33, 64)] == [1, 8, 8, 16, 64, 64]
    assert ladder.token_bucket(17) == 32 and ladder.rows_for_tokens(2048) == 64 and ladder.rows_for_tokens(16) == 16
    assert BucketLadder(48, 100).decode_batches == (1, 8, 16, 32, 48)
    assert BucketLadder(48, 100).token_buckets == (16, 32, 64, 100)


def test_without_the_single_row_program():
    ladder = BucketLadder(64, 2048, single_row_decode=False)
    assert ladder.decode_batches == (8, 16, 32, 64)
    assert ladder.decode_batch(1) == 8
    assert BucketLadder(4, 64, single_row_decode=False).decode_batches == (4,)  # fewer slots than 8 rows
    assert BucketLadder(1, 64, single_row_decode=False).decode_batches == (1,)


def _generate(monkeypatch=None):
    if monkeypatch is not None:  # the GPU ladder on this backend
        monkeypatch.setattr(runner_module, "BucketLadder", lambda rows, tokens, _single: BucketLadder(rows, tokens, False))
    llm = LLM("tiny-glm4", skip_tokenizer_init=True, compilation_cache_dir=None, max_batch_size=16,
              max_num_batched_tokens=32, decode_steps_per_call=4, max_logprobs=0, show_progress=False,
              dtype="float32", max_model_len=64)
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(3, 200, 9).tolist()}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return llm.engine.runner, out[0].outputs[0].token_ids


def test_one_sequence_through_the_eight_row_program(monkeypatch):
    reference_runner, reference = _generate()
    assert reference_runner.ladder.decode_batches == (1, 8, 16)
    runner, tokens = _generate(monkeypatch)
    assert runner.ladder.decode_batches == (8, 16)
    assert {key[1] for key in runner._executables if key[0] == "decode"} == {(8,), (16,)}  # token_ids' shape
    assert runner.num_traces == len(runner._executables)  # the 1-row decodes ran the 8-row program
    assert tokens == reference and len(tokens) == 12
