"""Shared test fixtures: tiny random Hugging Face checkpoints written by transformers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The GPU interpreter needs a CPU thread per warpgroup (pallas_kernels/_interpret.py); CI has 2 cores.
os.environ.setdefault("PJRT_NPROC", "8")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
