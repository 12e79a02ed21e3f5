"""The KV pool's allocation when the device has the room but not in one piece (``ModelRunner.allocate_pool``
with ``memory.park_on_host``): on an out-of-memory error the weights wait in host memory while the pool is
allocated, then come back with their shardings and serve the same tokens. CPU cannot fragment XLA's GPU
allocator, so the first allocation is made to fail with the runtime's error (as GLM-4-9B W8A8's did on an
H100: the quantizing load left 38 GiB free, no 24 GiB piece)."""

from __future__ import annotations

import jax
import pytest

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.engine import memory
from autoglm_jax.engine.runner import ModelRunner

SETTINGS = dict(model="tiny-glm4", skip_tokenizer_init=True, compilation_cache_dir=None, dtype="float32",
                max_batch_size=2, max_model_len=64, max_num_batched_tokens=16, decode_steps_per_call=2,
                show_progress=False, num_pages=16)
PROMPTS = [{"prompt_token_ids": list(range(5, 19))}, {"prompt_token_ids": list(range(40, 47))}]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 24.26GiB with allocator GPU_0_bfc on device 0."


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def _failing_pool(monkeypatch, failures: int, error=OOM):
    """Makes the runner's first ``failures`` pool allocations (with the weights bound) raise ``error``; records, per later call,
    whether the weights' device buffers were freed at that moment."""
    real = ModelRunner._pool_state
    calls = []

    def pool_state(self):
        if not self.has_weights:  # the abstract pool of a runner made from the abstract model
            return real(self)
        parked = all(x.is_deleted() for x in jax.tree.leaves(self.params))
        calls.append(parked)
        if len(calls) <= failures:
            raise jax.errors.JaxRuntimeError(error) if isinstance(error, str) else error
        return real(self)

    monkeypatch.setattr(ModelRunner, "_pool_state", pool_state)
    return calls


def test_pool_allocated_with_the_weights_parked_serves_the_same_tokens(monkeypatch, caplog):
    normal = LLM(**SETTINGS)
    expected = _tokens(normal)
    calls = _failing_pool(monkeypatch, failures=1)
    with caplog.at_level("WARNING", logger="autoglm_jax.engine.runner"):
        llm = LLM(**SETTINGS)
    assert calls == [False, True]  # the failed try beside the weights, then with them in host memory
    assert "no contiguous room" in caplog.text
    leaves = jax.tree.leaves(llm.engine.runner.params)
    assert leaves and not any(x.is_deleted() for x in leaves)
    assert _tokens(llm) == expected
    assert llm.engine.runner.num_traces == normal.engine.runner.num_traces  # the same programs, no retrace


def test_pool_that_does_not_fit_at_all_raises_with_the_weights_restored(monkeypatch):
    llm = LLM(**SETTINGS)
    runner = llm.engine.runner
    state, params = runner.state, runner.params
    runner.state = jax.eval_shape(lambda: state)  # as before allocate_pool
    _failing_pool(monkeypatch, failures=2)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        runner.allocate_pool()
    leaves = jax.tree.leaves(runner.params)
    assert not any(x.is_deleted() for x in leaves)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # parked and put back as new arrays
    assert not memory.is_out_of_memory(ValueError(OOM))


def test_other_allocation_errors_are_not_retried(monkeypatch):
    calls = _failing_pool(monkeypatch, failures=1, error="INTERNAL: some other failure")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        LLM(**SETTINGS)
    assert calls == [False]
