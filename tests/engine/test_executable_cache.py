"""Warm start from saved executables: a second engine start (another process) loads every step program
instead of tracing it, and generates the same tokens; stale or broken cache files are never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.executable_cache import ExecutableCache, fingerprint, resolve_executable_cache

SETTINGS = dict(dtype="float32", max_model_len=64, max_batch_size=2, max_num_batched_tokens=32,
                decode_steps_per_call=4, show_progress=False, warmup=True, skip_tokenizer_init=True,
                executable_cache=True)  # on CPU only when asked: each start here is its own process
PROMPTS = [list(range(5, 20)), list(range(30, 41))]

START = """
import json, sys
from autoglm_jax import LLM, SamplingParams
llm = LLM("tiny-llama", compilation_cache_dir=sys.argv[1], **json.loads(sys.argv[2]))
runner = llm.engine.runner
traces_after_warmup = runner.num_traces
outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(sys.argv[3])],
                    SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
print(json.dumps(dict(loaded=runner.num_loaded_executables, programs=len(runner._executables),
                      traces_after_warmup=traces_after_warmup, traces=runner.num_traces,
                      tokens=[o.outputs[0].token_ids for o in outs])))
"""


def _start(cache_dir) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", START, str(cache_dir), json.dumps(SETTINGS), json.dumps(PROMPTS)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_second_start_loads_every_program_and_traces_nothing(tmp_path):
    cold = _start(tmp_path)
    assert cold["loaded"] == 0 and cold["traces_after_warmup"] == cold["programs"] > 0
    assert len(list((tmp_path / "executables").glob("*.exe"))) == cold["programs"]
    warm = _start(tmp_path)  # another process: fingerprints must not depend on object ids
    assert warm["loaded"] == warm["programs"] == cold["programs"]
    assert warm["traces"] == 0  # neither warmup nor the generation traced a step
    assert warm["tokens"] == cold["tokens"]


def test_fingerprint_names_everything_that_changes_the_program(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    args = (jnp.zeros((4, 8), jnp.float32),)
    base = fingerprint("decode", "graph", args, {"max_steps": 4})
    assert base == fingerprint("decode", "graph", (jnp.ones((4, 8), jnp.float32),), {"max_steps": 4})  # values: no
    assert base != fingerprint("mixed", "graph", args, {"max_steps": 4})
    assert base != fingerprint("decode", "other graph", args, {"max_steps": 4})
    assert base != fingerprint("decode", "graph", args, {"max_steps": 8})
    assert base != fingerprint("decode", "graph", (jnp.zeros((4, 16), jnp.float32),), {"max_steps": 4})
    assert base != fingerprint("decode", "graph", (jnp.zeros((4, 8), jnp.bfloat16),), {"max_steps": 4})
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")  # compiler options from the environment
    assert base != fingerprint("decode", "graph", args, {"max_steps": 4})


def test_broken_or_missing_files_are_cache_misses(tmp_path):
    cache = ExecutableCache(str(tmp_path))
    assert cache.load("missing") is None
    compiled = jax.jit(lambda x: x * 2 + 1).lower(jnp.arange(4.0)).compile()
    cache.save("good", compiled)
    assert cache.load("good") is None  # written by this process: not loaded back into it
    ExecutableCache.saved_here.discard(tmp_path / "good.exe")  # as another process would see it
    np.testing.assert_array_equal(cache.load("good")(jnp.arange(4.0)), [1.0, 3.0, 5.0, 7.0])
    (tmp_path / "bad.exe").write_bytes(b"not an executable")
    assert cache.load("bad") is None
    (tmp_path / "truncated.exe").write_bytes((tmp_path / "good.exe").read_bytes()[:100])
    assert cache.load("truncated") is None


def test_setting_defaults_to_gpu_only_and_is_validated():
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_executable_cache(None, "/c") == ("/c/executables" if on_gpu else None)
    assert resolve_executable_cache(True, "/c") == "/c/executables"
    assert resolve_executable_cache(True, None) is None  # no compilation cache dir: nowhere to save
    assert resolve_executable_cache(False, "/c") is None
    assert EngineConfig().executable_cache is None
    with pytest.raises(ValueError, match="executable_cache='yes'"):
        EngineConfig(executable_cache="yes")


def test_second_engine_in_the_same_process_compiles_instead_of_loading(tmp_path):
    from autoglm_jax import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens, loaded = [], []
    for _ in range(2):  # as a notebook starting a second engine (XLA:CPU failed to run such a load)
        llm = LLM("tiny-llama", compilation_cache_dir=str(tmp_path), **SETTINGS)
        loaded.append(llm.engine.runner.num_loaded_executables)
        tokens.append([o.outputs[0].token_ids for o in
                       llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)])
    assert loaded == [0, 0] and tokens[0] == tokens[1]
