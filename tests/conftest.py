"""Shared test settings: the CPU platform, GPU-only tests skipped on CPU, and ``.ci/run``'s crash resume.

Crash resume: with ``AUTOGLM_TESTS_DONE=FILE`` set, every finished test appends ``done <nodeid>`` to FILE
(and ``failed <nodeid>`` for a failure), and a new run leaves out the tests FILE marks done. ``.ci/run``
uses it to go on in a fresh process when the interpreter dies from a signal inside native code (one
segfault in 27 CI runs, while a fixture compiled XLA:CPU programs; not reproduced in a clean-clone run
here) instead of losing the whole run; a test failure is never retried.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The GPU interpreter needs a CPU thread per warpgroup (pallas_kernels/_interpret.py); CI has 2 cores.
os.environ.setdefault("PJRT_NPROC", "8")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


DONE_FILE = os.environ.get("AUTOGLM_TESTS_DONE")


def _done_tests() -> set[str]:
    if not DONE_FILE or not os.path.exists(DONE_FILE):
        return set()
    with open(DONE_FILE) as f:
        return {line.rstrip("\n").split(" ", 1)[1] for line in f if line.startswith("done ")}


def pytest_runtest_logreport(report):
    if DONE_FILE and (report.failed or report.when == "teardown"):
        with open(DONE_FILE, "a") as f:
            f.write(f"{'failed' if report.failed else 'done'} {report.nodeid}\n")


def pytest_collection_modifyitems(config, items):
    done = _done_tests()
    if done:
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = [item for item in items if item.nodeid not in done]
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
