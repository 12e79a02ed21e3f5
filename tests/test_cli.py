"""The absl CLI: `autoglm generate` prints coherent text on CPU; `autoglm convert` writes an Orbax
checkpoint that loads bit-exactly and generates the same tokens."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.checkpoint.loader import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_generate_prints_coherent_text():
    result = _run("autoglm_jax.cli.main", "generate", "--prompt", "What is the capital of France?",
                  "--max_new_tokens", "24", "--max_model_len", "256")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout, result.stdout
    assert "tok/s" in result.stderr


def test_unknown_command_exits_2():
    result = _run("autoglm_jax.cli.main", "frobnicate")
    assert result.returncode == 2 and "unknown command" in result.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("ckpt") / "smollm2")
    result = _run("autoglm_jax.cli.main", "convert", f"--output={output}", "--dtype=float32")
    assert result.returncode == 0, result.stderr[-2000:]
    return output


def test_converted_checkpoint_is_bit_exact(converted):
    _, gguf_model, _ = load_model(None, dtype=np.float32)
    _, orbax_model, source = load_model(converted, dtype=np.float32)
    assert source.kind == "orbax"
    a, b = nnx.to_pure_dict(nnx.state(gguf_model)), nnx.to_pure_dict(nnx.state(orbax_model))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_converted_checkpoint_generates_the_same(converted):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt = [{"role": "user", "content": "Name a color."}]
    kwargs = dict(dtype="float32", max_model_len=256, max_batch_size=2, max_num_batched_tokens=64,
                  compilation_cache_dir=None, show_progress=False)
    ours = LLM(converted, **kwargs).chat(prompt, params, use_tqdm=False)[0].outputs[0]
    reference = LLM(None, **kwargs).chat(prompt, params, use_tqdm=False)[0].outputs[0]
    assert ours.token_ids == reference.token_ids and ours.text == reference.text
