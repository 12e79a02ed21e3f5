"""Shared test fixtures: tiny random Hugging Face checkpoints written by transformers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The GPU interpreter runs each warpgroup of a CTA as its own program on the CPU client's thread pool, blocking
# in barrier waits; a pool of one thread per core (2 on CI) starves the third warpgroup of a kernel whose
# programs are too costly to run inline (a deadlock). Read once, when the CPU client is created.
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
