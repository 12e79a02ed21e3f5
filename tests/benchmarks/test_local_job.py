"""Benchmarks run as a job of two local processes (``benchmarks/_local_job.py``; CPU: one device each, gloo
collectives): ``allreduce.py --processes=2`` times psum, ``multi_gpu.py --processes=2`` decodes through the
multi-host engine with TP=2; a bad flag fails the job with its error, not a hang."""

import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"}
    env.pop("XLA_FLAGS", None)
    env.pop("AUTOGLM_PROCESS_ID", None)
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT / "benchmarks", env=env, capture_output=True,
                          text=True, timeout=600)


def test_two_processes_time_psum():
    run = _run("allreduce.py", "--hidden=256", "--count=3", "--tp=2", "--processes=2", "--batch=1,4")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "cpu x2 in 2 process(es)" in run.stdout
    rows = re.findall(r"^\| 2 \| 2 \| (\d+) \| \(psum: one process only\) \| ([\d.]+) \| – \|", run.stdout, re.M)
    assert [batch for batch, _ in rows] == ["1", "4"] and all(float(ms) > 0 for _, ms in rows)


def test_a_failing_process_fails_the_job():
    run = _run("allreduce.py", "--hidden=256", "--count=3", "--tp=3", "--processes=2", "--batch=1")
    assert run.returncode != 0
    assert "with --processes the mesh is every device of the job (2)" in run.stdout + run.stderr


def test_two_processes_decode_with_tensor_parallelism():
    run = _run("multi_gpu.py", "--processes=2", "--model=tiny-glm4", "--dtype=float32", "--tp=2", "--dp=", "--batch=1,4",
               "--context=16", "--decode_tokens=8", "--steps_per_call=2", "--noprofile")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "TP over 2 processes" in run.stdout
    rows = re.findall(r"^\s+2\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", run.stdout, re.M)
    assert [batch for batch, _, _ in rows] == ["1", "4"] and all(float(ms) > 0 for _, ms, _ in rows)


def test_a_failing_follower_ends_the_job_while_process_0_waits(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    import _local_job

    script = ("import os, sys, time\n"
              "if os.environ['AUTOGLM_PROCESS_ID'] == '1': print('follower broke'); sys.exit(3)\n"
              "time.sleep(120)")
    began = time.monotonic()
    assert _local_job.launch(2, timeout_s=100, argv=[sys.executable, "-c", script]) == 3
    assert time.monotonic() - began < 60  # process 0 was killed, not waited for
    err = capsys.readouterr().err
    assert "process 1 exited 3" in err and "follower broke" in err
