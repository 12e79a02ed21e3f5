"""Bad input gets a clear error for that request only; the engine keeps serving the others, through
``EngineCore.add_request`` (tiny model) and ``AutoGLMEngine.submit`` from threads (default model)."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_jax.sampling_params import SamplingParams
from tests.engine.conftest import random_prompt

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

# (prompt, params, error type, message pattern) against the tiny model: vocab 256, max length 128,
# max_logprobs 5, no tokenizer.
TINY_BAD = [
    ({"prompt_token_ids": []}, GREEDY, ValueError, "empty"),
    ({"prompt_token_ids": list(range(3, 131))}, GREEDY, ValueError, "128 tokens; max_sequence_length=128"),
    ({"prompt_token_ids": [5, 256]}, GREEDY, ValueError, r"\[256\] are outside the vocabulary \[0, 256\)"),
    ({"prompt_token_ids": [5, -1]}, GREEDY, ValueError, "outside the vocabulary"),
    ({"prompt_token_ids": [5, 2.5]}, GREEDY, TypeError, "must be ints"),
    ({"tokens": [5]}, GREEDY, ValueError, "needs 'prompt_token_ids'"),
    (None, GREEDY, TypeError, "got NoneType"),
    ("text", GREEDY, ValueError, "no tokenizer"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(logprobs=6), ValueError, "max_logprobs=5"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(prompt_logprobs=-1), ValueError, "asks for 256 logprobs"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(stop=["x"]), ValueError, "stop strings need a tokenizer"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(stop_token_ids=list(range(3, 23))), ValueError, "limit of 16"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(stop_token_ids=[2**40]), ValueError, "outside the vocabulary"),
    ({"prompt_token_ids": [5, 6]}, {"temperature": 0}, TypeError, "must be SamplingParams"),
]
BAD_SAMPLING_VALUES = [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5), dict(n=0),
                       dict(max_tokens=0), dict(min_tokens=5, max_tokens=2), dict(presence_penalty=3.0),
                       dict(repetition_penalty=0.0), dict(stop=[""]), dict(logprobs=-2), dict(seed=1.5)]


@pytest.mark.parametrize("values", BAD_SAMPLING_VALUES, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_bad_sampling_values_raise_naming_the_field(values):
    with pytest.raises(ValueError, match=next(iter(values))):
        SamplingParams(**values)


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(tiny_llm):
    core = tiny_llm.engine
    rng = np.random.default_rng(41)
    good = [random_prompt(rng, n) for n in (6, 40)]
    solo = [tiny_llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in good]
    before = core.add_request(good[0], GREEDY).request_id
    core.step()  # the first good request is running while the bad ones arrive
    for prompt, params, error, message in TINY_BAD:
        with pytest.raises(error, match=message):
            core.add_request(prompt, params)
    after = core.add_request(good[1], GREEDY).request_id
    final = {}
    while core.has_unfinished_requests():
        final.update({o.request_id: o for o in core.step() if o.finished})
    assert final[before].outputs[0].token_ids == solo[0] and final[after].outputs[0].token_ids == solo[1]
    assert set(final) == {before, after}
    core.add_request(good[0], GREEDY, request_id="same-id")
    with pytest.raises(ValueError, match="'same-id' is already in use"):
        core.add_request(good[1], GREEDY, request_id="same-id")
    assert core.abort("same-id") and not core.has_unfinished_requests()


def test_top_k_beyond_int32_means_off(tiny_llm):
    """A huge top_k must not overflow the int32 sampling arrays (it would fail every request in the step)."""
    prompt = {"prompt_token_ids": [5, 6, 7]}
    huge, off = (tiny_llm.generate(prompt, SamplingParams(temperature=1.0, top_k=k, seed=3, max_tokens=6),
                                   use_tqdm=False)[0].outputs[0].token_ids for k in (2**40, -1))
    assert huge == off


def test_bad_submissions_fail_in_the_callers_thread(default_engine):
    good = default_engine.submit("The capital of France is", GREEDY)
    for prompt, params, message in [("", GREEDY, "empty"), ("word " * 2100, GREEDY, "max_sequence_length=2048"),
                                    ({"prompt_token_ids": [49152]}, GREEDY, "outside the vocabulary"),
                                    ("hi", SamplingParams(logprobs=6), "max_logprobs=5")]:
        with pytest.raises(ValueError, match=message):
            default_engine.submit(prompt, params)
    assert default_engine.generate("1, 2, 3,", GREEDY).outputs[0].finish_reason == "length"
    assert len(good.result(timeout=60).outputs[0].token_ids) == 8


def test_unknown_matmul_backend_is_refused_by_name():
    from autoglm_jax.engine.config import EngineConfig

    assert EngineConfig(matmul_backend="pallas").matmul_backend == "pallas"
    with pytest.raises(ValueError, match="matmul_backend='cublas'"):
        EngineConfig(matmul_backend="cublas")


@pytest.mark.parametrize("bad", [0, -1.0, True, "0.5"])
def test_bad_gil_switch_interval_is_refused_by_name(bad):
    from autoglm_jax.engine.config import EngineConfig

    with pytest.raises(ValueError, match="gil_switch_interval_ms"):
        EngineConfig(gil_switch_interval_ms=bad)


@pytest.mark.parametrize("bad", ["on", None, True])
def test_bad_python_gc_is_refused_by_name(bad):
    from autoglm_jax.engine.config import EngineConfig

    with pytest.raises(ValueError, match="python_gc"):
        EngineConfig(python_gc=bad)


def test_python_gc_is_tuned_for_the_engine_process(tiny_model_dir, monkeypatch):
    """python_gc="tuned" collects and freezes the heap once the engine is built and raises the first
    generation's threshold (later generations keep theirs); "default" leaves the collector alone, and
    "auto" tunes it on GPU only."""
    import gc

    from autoglm_jax.engine.core import GC_THRESHOLD0, EngineCore, resolve_python_gc

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))  # the process's own collector stays as it is
    monkeypatch.setattr(gc, "set_threshold", lambda *t: calls.append(t))
    _, threshold1, threshold2 = gc.get_threshold()
    for mode, expected in (("default", []), ("tuned", ["freeze", (GC_THRESHOLD0, threshold1, threshold2)])):
        calls.clear()
        EngineCore(model=tiny_model_dir, python_gc=mode, warmup=False, num_pages=16, max_batch_size=2,
                   max_sequence_length=64, show_progress=False)
        assert calls == expected, mode
    monkeypatch.setattr("jax.default_backend", lambda: "cpu")
    assert not resolve_python_gc("auto") and resolve_python_gc("tuned") and not resolve_python_gc("default")
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    assert resolve_python_gc("auto") and not resolve_python_gc("default")


def test_gil_switch_interval_is_set_for_the_engine_process(tiny_model_dir, monkeypatch):
    """An engine built with gil_switch_interval_ms sets Python's switch interval; the default leaves it
    alone on CPU and is 0.5 ms on GPU."""
    import sys

    from autoglm_jax.engine.core import EngineCore, resolve_gil_switch_interval

    calls = []
    monkeypatch.setattr(sys, "setswitchinterval", calls.append)  # the process's own setting stays as it is
    EngineCore(model=tiny_model_dir, gil_switch_interval_ms=0.25, warmup=False, num_pages=16, max_batch_size=2,
               max_sequence_length=64, show_progress=False)
    assert calls == [pytest.approx(0.00025)]
    monkeypatch.setattr("jax.default_backend", lambda: "cpu")
    assert resolve_gil_switch_interval(None) is None and resolve_gil_switch_interval(2) == 0.002
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    assert resolve_gil_switch_interval(None) == pytest.approx(0.0005)
