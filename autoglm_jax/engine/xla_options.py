"""Per-program XLA compiler options of the engine's step programs: which emitter runs their GEMMs.

Owns ``XLA_GEMM_BACKENDS`` (the engine arg ``xla_gemm_backend``) and ``gemm_compiler_options``, the
compiler options of a step program whose matmuls have ``rows`` rows (a decode program: its batch
rows; a mixed program: its token bucket). XLA on a GPU emits a bf16 GEMM either as a Triton fusion
(autotuned tiles and split-K; ``xla_gpu_enable_triton_gemm``, XLA's default) or as a cuBLAS call.
Neither wins everywhere on the H100 (``benchmarks/decode.py --xla_gemm_backends=triton,cublas``,
RESULTS "Session 11"): at one row Triton's split-K GEMV runs the GLM-4-9B decode step in 8.06 ms and
cuBLAS in 31.5 ms, at 64 rows cuBLAS takes it from 9.29 to 8.76 ms. So "auto" compiles the programs
of ``CUBLAS_MIN_ROWS`` rows or more with Triton GEMMs off, the smaller ones with XLA's default. The
options are compiled into each program (``jax.jit(compiler_options=...)``), not set process-wide
through ``XLA_FLAGS``, so one engine holds programs of both kinds. Off a GPU the option changes
nothing (XLA:CPU has no Triton GEMMs) but is passed all the same, so the CPU tests run the same
programs' plumbing.
"""

from __future__ import annotations

XLA_GEMM_BACKENDS = ("auto", "triton", "cublas")

# Rows from which "auto" runs a program's GEMMs through cuBLAS (benchmarks/decode.py on the H100).
CUBLAS_MIN_ROWS = 64


def gemm_compiler_options(backend: str, rows: int) -> dict[str, bool]:
    """XLA compiler options for a step program with ``rows`` matmul rows under ``backend``."""
    if backend not in XLA_GEMM_BACKENDS:
        raise ValueError(f"xla_gemm_backend={backend!r}; choose one of {XLA_GEMM_BACKENDS}")
    cublas = backend == "cublas" or (backend == "auto" and rows >= CUBLAS_MIN_ROWS)
    return {"xla_gpu_enable_triton_gemm": False} if cublas else {}
