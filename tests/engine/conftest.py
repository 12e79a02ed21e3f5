"""Engine test fixtures: one compiled engine per configuration for the whole session, and an
independent reference that runs the engine's model directly over one sequence (no scheduler, no
paging across sequences, no sampler): ``tests/model_runner.py``.

Engines (compiling the bucket ladder dominates the test time, so they are shared):
  - ``tiny_llm``: a saved tiny random Llama checkpoint (tests/hf_tiny.py, varied greedy outputs),
    max_batch_size=4, max_model_len=128, token budget 32, 4 decode steps per call, max_logprobs=5.
  - ``default_engine``: ``AutoGLMEngine`` on the default SmolLM2 with the issue's acceptance
    settings; ``default_llm`` wraps the same core in ``LLM`` (the loop thread is stopped meanwhile).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.engine.async_engine import AutoGLMEngine
from autoglm_jax.llm import LLM
from tests.hf_tiny import save_tiny
from tests.model_runner import forward, new_cache

# page_size 16: a 128-token sequence spans up to 8 pages, so tests can make a pool tight page by page
TINY_ENGINE_ARGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, max_batch_size=4, max_model_len=128,
                        max_num_batched_tokens=32, decode_steps_per_call=4, max_logprobs=5, page_size=16)
ACCEPTANCE_CONFIG = {"use_dynamic_batching": True, "max_batch_size": 32, "max_sequence_length": 2048,
                     "prefill_ratio": 0.8}
# Smaller compile ladder / KV pool for CPU CI; the four acceptance values above are kept.
DEFAULT_ENGINE_OVERRIDES = {"max_num_batched_tokens": 32, "decode_steps_per_call": 4, "num_pages": 384,
                            "max_logprobs": 5, "compilation_cache_dir": None}


def random_prompt(rng: np.random.Generator, length: int, vocab: int = 256) -> dict:
    """Token ids 3.. (avoids the tiny checkpoint's pad/eos/bos ids 0, 1, 2)."""
    return {"prompt_token_ids": rng.integers(3, vocab, length).tolist()}


def jit_cache_sizes(runner) -> tuple[int, int]:
    """Compiled programs per step kind (mixed, decode): the warmed-up executables the runner calls
    directly, plus whatever the jitted fallbacks compiled for shapes warmup did not cover."""
    kinds = [key[0] for key in runner._executables]
    fallback = {kind: sum(fn.jitted._cache_size() for (k, _), fn in runner._jitted.items() if k == kind)
                for kind in ("mixed", "decode")}
    return kinds.count("mixed") + fallback["mixed"], kinds.count("decode") + fallback["decode"]


def num_ladder_buckets(runner) -> int:
    return len(runner.ladder.token_buckets) + len(runner.ladder.decode_batches)


class Reference:
    """Float32 logits of the engine's model over one whole sequence, computed without the engine."""

    def __init__(self, core):
        self.model = nnx.merge(core.runner.graphdef, core.runner.params)
        self.config = core.model_config

    @functools.lru_cache(maxsize=256)
    def _logits(self, token_ids: tuple[int, ...]) -> np.ndarray:
        cache, table = new_cache(self.config, len(token_ids), jax.numpy.float32)
        logits, _ = forward(self.model, list(token_ids), 0, cache, table)
        return logits

    def logits(self, token_ids) -> np.ndarray:
        """[len(token_ids), V]: row t is the distribution of the token after token_ids[:t + 1]."""
        return self._logits(tuple(int(t) for t in token_ids))

    def output_logits(self, prompt, output) -> np.ndarray:
        """[len(output), V]: the logits each output token was sampled from (teacher forcing)."""
        full = list(prompt) + list(output)
        return self.logits(full[:-1])[len(prompt) - 1 :]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def assert_greedy(reference: Reference, prompt, output, penalize=None, tol: float = 1e-4) -> None:
    """Each output token is the argmax of the reference logits given the tokens before it (ties within
    ``tol`` accepted). ``penalize(logits [V], step)`` may transform the logits first."""
    logits = reference.output_logits(prompt, output)
    for i, token in enumerate(output):
        row = logits[i] if penalize is None else penalize(logits[i].copy(), i)
        assert row[token] >= row.max() - tol, (
            f"output token {i} = {token} (logit {row[token]:.6f}) is not the argmax {int(row.argmax())} "
            f"(logit {row.max():.6f}); output {list(output)}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny("LlamaForCausalLM", path, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir) -> LLM:
    return LLM(model=tiny_model_dir, **TINY_ENGINE_ARGS)


@pytest.fixture(scope="session")
def tiny_reference(tiny_llm) -> Reference:
    return Reference(tiny_llm.engine)


@pytest.fixture(scope="session")
def _default_engine_session():
    engine = AutoGLMEngine({**ACCEPTANCE_CONFIG, **DEFAULT_ENGINE_OVERRIDES})
    yield engine
    engine.stop(drain=False)


@pytest.fixture
def default_engine(_default_engine_session) -> AutoGLMEngine:
    """The default-model AutoGLMEngine, running."""
    return _default_engine_session.start()


@pytest.fixture
def default_llm(_default_engine_session) -> LLM:
    """``LLM`` over the default engine's core, with its loop thread stopped (drained) meanwhile."""
    engine = _default_engine_session
    if engine.core is None:
        engine.start()
    engine.stop(drain=True)
    return LLM.from_engine(engine.core)
