"""Runs a benchmark script as one JAX job of N processes on this machine, one GPU each.

Owns: starting ``python <the same script and flags>`` N times with the environment of
``autoglm_jax.parallel.distributed`` (a coordinator on a free localhost port, process ids 0..N-1) and,
unless the platform is CPU, ``CUDA_VISIBLE_DEVICES`` set to the process's own GPU of the ones visible to
the parent; waiting for all of them (killing the rest when one fails or the time is up); and the child's
side, ``join()``. Process 0's output goes to the terminal; another process's output is printed only when
it fails. Why: inside one process one XLA client drives every GPU and synchronises its devices' threads
around the collectives; a job of one-GPU processes (vLLM's TP, a multi-host deployment of
``parallel.multihost``) does not. Measured on 2 x H200 (RESULTS "Session 19"): it does not lower the ~20 µs
per small all-reduce (19.8 µs vs 17.7 in one process) nor TP=2 batch-1 decode (8.21 vs 8.23-8.46 ms).

    if _local_job.is_child(): _local_job.join()          # first thing in main, before any jax backend use
    elif FLAGS.processes > 1: sys.exit(_local_job.launch(FLAGS.processes))
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from autoglm_jax.parallel.distributed import ENV_PROCESS_ID, free_port, initialize, local_process_env


def is_child() -> bool:
    """Whether this process was started by ``launch`` (or by any launcher that set the job environment)."""
    return ENV_PROCESS_ID in os.environ


def join() -> None:
    """Joins the job described by the environment (blocks until every process has)."""
    initialize()


def launch(num_processes: int, timeout_s: float = 1800.0, argv: list[str] | None = None) -> int:
    """Runs ``argv`` (default: this script with its flags) as ``num_processes`` processes of one job;
    returns 0 when every process exited 0, else the first failure's exit code (1 on a timeout)."""
    if num_processes < 2:
        raise ValueError(f"{num_processes=} must be >= 2 (one process needs no launcher)")
    argv = argv if argv is not None else [sys.executable, *sys.argv]
    on_gpu = not os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(rank) for rank in range(num_processes)]
    if on_gpu and len(gpus) < num_processes:
        raise ValueError(f"{num_processes} processes need as many GPUs; CUDA_VISIBLE_DEVICES has {len(gpus)}")
    port = free_port()
    logs, procs = [], []
    for rank in range(num_processes):
        env = {**os.environ, **local_process_env(rank, num_processes, port)}
        if on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank]
        log = None if rank == 0 else tempfile.TemporaryFile("w+")
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT if log else None))
    deadline, failure = time.monotonic() + timeout_s, 0
    while True:
        codes = [p.poll() for p in procs]  # every process each time: a follower may fail while process 0 waits
        failure = next((code for code in codes if code not in (None, 0)), 0)
        if failure or all(code is not None for code in codes):
            break
        if time.monotonic() > deadline:
            print(f"local job: timed out after {timeout_s:.0f} s", file=sys.stderr)
            failure = 1
            break
        time.sleep(0.2)
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if log is not None:
            if proc.returncode:
                log.seek(0)
                print(f"--- process {rank} exited {proc.returncode}:\n{log.read()[-4000:]}", file=sys.stderr)
            log.close()
    return failure
