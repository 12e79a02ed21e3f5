"""Fixtures of the quantization tests: tiny transformers checkpoints (non-trivial random weights)."""

import pytest

from tests.hf_tiny import save_tiny


@pytest.fixture(scope="session", params=["GlmForCausalLM", "LlamaForCausalLM"])
def tiny_checkpoint(request, tmp_path_factory):
    """(architecture, directory) of a tiny HF checkpoint with K = 64 / 96 linears."""
    directory = tmp_path_factory.mktemp(f"quant_{request.param}")
    save_tiny(request.param, directory, seed=3)
    return request.param, str(directory)
