"""Shared test settings: the CPU platform, GPU-only tests skipped on CPU, compiled programs released after
each test module, and ``.ci/run``'s crash resume.

Compiled programs: XLA:CPU maps ~6 memory regions per executable and jax's caches keep every executable of the
session alive. The whole suite reached Linux's ``vm.max_map_count`` (65,530) at ~92%, where an mmap fails and
the process segfaults (session 17's CI; reproduced in a clean clone with the count at 65,030). After each
module ``jax.clear_caches()`` + ``gc.collect()`` release them, and a module that leaves more than
``MAX_MAP_FRACTION`` of the limit mapped after that is an error (a leak of compiled programs).

Crash resume: with ``AUTOGLM_TESTS_DONE=FILE`` set, every finished test appends ``done <nodeid>`` to FILE
(and ``failed <nodeid>`` for a failure), and a new run leaves out the tests FILE marks done. ``.ci/run``
uses it to go on in a fresh process when the interpreter dies from a signal inside native code instead of
losing the whole run; a test failure is never retried.
"""

import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # on a GPU machine: JAX_PLATFORMS=cuda,cpu (tests/kernels/conftest.py)
# The GPU interpreter needs a CPU thread per warpgroup (pallas_kernels/_interpret.py); CI has 2 cores.
os.environ.setdefault("PJRT_NPROC", "8")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


DONE_FILE = os.environ.get("AUTOGLM_TESTS_DONE")
MAX_MAP_FRACTION = 0.5


def _num_maps() -> int | None:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


def _max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Runs after the module's other fixtures are torn down (autouse: set up first, torn down last)."""
    yield
    jax.clear_caches()
    gc.collect()
    maps, limit = _num_maps(), _max_map_count()
    if maps is not None and limit is not None and maps > MAX_MAP_FRACTION * limit:
        raise RuntimeError(f"{maps} memory maps after releasing this module's compiled programs "
                           f"(vm.max_map_count {limit}): something keeps executables alive")


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
