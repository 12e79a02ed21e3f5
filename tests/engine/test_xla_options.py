"""Per-program XLA GEMM options (engine arg ``xla_gemm_backend``, ``engine.xla_options``): the rule by
matmul rows, the options reaching XLA for exactly the programs at or above the threshold (warmup's
ahead-of-time compiles and the jitted fallback alike), and the same tokens whatever the choice."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_jax.engine import runner as runner_module
from autoglm_jax.engine import xla_options
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.xla_options import CUBLAS_MIN_ROWS, gemm_compiler_options
from autoglm_jax.llm import LLM
from autoglm_jax.sampling_params import SamplingParams

OFF = {"xla_gpu_enable_triton_gemm": False}
ARGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, max_batch_size=8, max_num_batched_tokens=32,
            decode_steps_per_call=4, max_logprobs=0, show_progress=False, dtype="float32", max_model_len=64,
            num_pages=64)  # not sized from free device memory (a failed start on a GPU may still hold some)


def test_rule_by_rows():
    assert gemm_compiler_options("auto", 1) == {} and gemm_compiler_options("auto", CUBLAS_MIN_ROWS - 1) == {}
    assert gemm_compiler_options("auto", CUBLAS_MIN_ROWS) == OFF == gemm_compiler_options("auto", 2048)
    assert gemm_compiler_options("cublas", 1) == OFF and gemm_compiler_options("triton", 4096) == {}
    with pytest.raises(ValueError, match="xla_gemm_backend='cudnn'; choose one of"):
        gemm_compiler_options("cudnn", 8)
    with pytest.raises(ValueError, match="xla_gemm_backend='Triton'"):
        EngineConfig(xla_gemm_backend="Triton")


def _generate(**overrides):
    llm = LLM("tiny-llama", **{**ARGS, **overrides})
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": rng.integers(3, 200, n).tolist()} for n in (5, 23, 11)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    return llm.engine.runner, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("warmup", [True, False])
def test_options_reach_xla_for_programs_at_the_threshold(monkeypatch, warmup):
    """An option XLA does not know fails the compile of exactly the programs it is given: the 16- and
    32-token mixed programs (rows >= 16 here), not the decode programs of <= 8 rows, which then serve."""
    bogus = lambda backend, rows: {"xla_gpu_no_such_option": True} if rows >= 16 else {}
    monkeypatch.setattr(runner_module, "gemm_compiler_options", bogus)
    with pytest.raises(Exception, match="No such compile option: 'xla_gpu_no_such_option'"):
        _generate(warmup=warmup)
    runner, tokens = _generate(warmup=warmup, max_num_batched_tokens=8)  # every program < 16 rows
    assert all(len(t) == 7 for t in tokens)
    assert {key for key in runner._jitted} <= {("mixed", ()), ("decode", ())}


def test_auto_compiles_both_kinds_and_serves_the_same_tokens(monkeypatch):
    monkeypatch.setattr(xla_options, "CUBLAS_MIN_ROWS", 16)
    triton_runner, triton_tokens = _generate(xla_gemm_backend="triton")
    auto_runner, auto_tokens = _generate(xla_gemm_backend="auto")
    assert auto_tokens == triton_tokens
    assert set(triton_runner._jitted) == {("mixed", ()), ("decode", ())}
    off = tuple(OFF.items())
    assert set(auto_runner._jitted) == {("mixed", off), ("decode", ())}  # mixed 16, 32 tokens / decode 1, 8 rows
    # warmup compiled the whole ladder ahead of time; nothing else traced while serving
    assert auto_runner.num_traces == len(auto_runner._executables)
