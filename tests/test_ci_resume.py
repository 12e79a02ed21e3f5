"""``.ci/pytest-resume``: after a native crash the unfinished tests run in a fresh process; a test failure,
before or after the crash, still fails the run; a test that crashes every time fails it."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CRASHING_TESTS = '''
import ctypes, os

def test_before():
    assert os.environ["BEFORE_FAILS"] == "0"

def test_crash():
    marker = os.environ["CRASH_MARKER"]
    if os.environ["CRASH_ALWAYS"] == "1" or not os.path.exists(marker):
        open(marker, "w").close()
        ctypes.string_at(0)  # SIGSEGV

def test_after():
    assert os.environ["AFTER_FAILS"] == "0"
'''


def _run(tmp_path, *, always: bool = False, before_fails: bool = False, after_fails: bool = False) -> subprocess.CompletedProcess:
    (tmp_path / "test_crashing.py").write_text(CRASHING_TESTS)
    env = {**os.environ, "CRASH_MARKER": str(tmp_path / "crashed"), "CRASH_ALWAYS": str(int(always)),
           "BEFORE_FAILS": str(int(before_fails)),
           "AFTER_FAILS": str(int(after_fails)), "PYTHONFAULTHANDLER": "1"}
    env.pop("AUTOGLM_TESTS_DONE", None)
    args = ["-p", "tests.conftest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
            str(tmp_path / "test_crashing.py")]
    return subprocess.run(["bash", str(ROOT / ".ci" / "pytest-resume"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the repo's .venv")
def test_a_crash_resumes_the_unfinished_tests(tmp_path):
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pytest died from signal 11 after 1 finished tests" in run.stdout
    assert "2 passed, 1 deselected" in run.stdout  # test_before is not run again
    assert "test_crashing.py\", line" in run.stdout  # the crashed frames are printed again at the end


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the repo's .venv")
def test_failures_and_repeated_crashes_fail_the_run(tmp_path):
    failed_after = _run(tmp_path, after_fails=True)
    assert failed_after.returncode == 1 and "1 failed, 1 passed" in failed_after.stdout
    (tmp_path / "crashed").unlink()
    failed_before = _run(tmp_path, before_fails=True)
    assert failed_before.returncode == 1 and "tests had failed before the crash" in failed_before.stdout
    (tmp_path / "crashed").unlink()
    always = _run(tmp_path, always=True)
    assert always.returncode == 139 and "pytest ran 3 times after crashes; exit status 139" in always.stdout
