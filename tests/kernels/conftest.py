"""Shared fixtures for kernel tests: where kernels run, and how results are compared.

On a machine without a GPU every kernel runs in the Mosaic GPU interpreter (``gpu_interpret``);
on a GPU the same tests run the compiled kernels. ``gpu``-marked tests are skipped on CPU by
``tests/conftest.py``. On a GPU machine run with ``JAX_PLATFORMS=cuda,cpu``: the GPU is the default backend, and
the tests that run the interpreter on purpose (``gpu_interpret`` around a kernel) find the CPU device it needs
(with ``cuda`` alone their ``io_callback`` fails: session 21).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

from pallas_kernels._interpret import gpu_interpret

ON_GPU = jax.default_backend() == "gpu"
BF16_REL_TOL = 1e-2


@pytest.fixture
def kernel_context():
    """Context in which to call kernels: real GPU, or the CPU interpreter."""
    return contextlib.nullcontext if ON_GPU else gpu_interpret


def assert_close(out, ref, rel_tol: float = BF16_REL_TOL, what: str = ""):
    """‖out − ref‖ / ‖ref‖ <= rel_tol, no NaN/Inf anywhere; reports max and mean abs error."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != reference {ref.shape}"
    bad = ~np.isfinite(out)
    assert not bad.any(), f"{what}: {bad.sum()} non-finite outputs (unwritten elements?) at {np.argwhere(bad)[:5]}"
    err = np.abs(out - ref)
    rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel <= rel_tol, f"{what}: rel err {rel:.3e} > {rel_tol}; max abs {err.max():.3e}, mean abs {err.mean():.3e}"
