"""W8A8 GEMMs through XLA at GLM-4-9B projection shapes: which weight layout reaches the 8-bit Tensor Cores.

Owns: one measurement - the model's W8A8 rule (per-token dynamic activation quantization, 8-bit x 8-bit
dot, both scales applied in float32) with the weight stored [K, N] (as ``quant.ChannelWeight`` keeps
it) against the same with the weight stored [N, K] (K-major, the layout cuBLASLt's fp8 GEMM takes
without a transpose), next to the bf16 dot, per token count M, and for M <= 128 the Pallas kernel
``pallas_kernels.w8a8_matmul`` on the [N, K] weight (same activation quantization and scales; its default
config: the tuning table, else the heuristic). Each call streams distinct weight buffers (together larger
than L2) inside one jitted program (``_timing.time_chained_ms``).

Run: ``JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/w8a8_gemm.py --ms=1,64,256,2048``
(CPU: ``--ms=1 --shapes=o_proj --min_bytes=1000000`` runs it tiny).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from absl import app, flags

from autoglm_jax.quant.channel import quantize_activations, w8a8_product
from benchmarks._timing import time_chained_ms
from benchmarks.tune_matmul import SHAPES
from pallas_kernels import w8a8_matmul as w8mm
from pallas_kernels.matmul import SMALL_M_MAX

_MS = flags.DEFINE_list("ms", ["1", "64", "256", "2048"], "token counts M")
_SHAPES = flags.DEFINE_list("shapes", ["qkv", "o_proj", "gate_up", "down"], "projection names")
_STORAGE = flags.DEFINE_list("storage", ["fp8", "int8"], "8-bit storage types")
_MIN_BYTES = flags.DEFINE_integer("min_bytes", 200 << 20, "bytes of distinct weights per timed program")

DTYPES = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}


def bf16_kn(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _w8a8(storage: str, nk: bool):
    """The model's W8A8 XLA rule (``quant.channel.w8a8_product``) with the weight [N, K] (nk) or [K, N]."""
    def fn(x, w, scales):
        return w8a8_product(x, w, scales, storage, weights_nk=nk).astype(x.dtype)
    return fn


def _w8a8_kernel(storage: str):
    def fn(x, w, scales):  # w [N, K]
        xq, x_scales = quantize_activations(x, storage)
        return w8mm.w8a8_matmul(xq, x_scales[:, 0], w, scales, out_dtype=x.dtype)
    return fn


def _weights(key, k: int, n: int, dtype, nk: bool, copies: int):
    shape = (n, k) if nk else (k, n)
    out = []
    for i in range(copies):
        w = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
        w = jnp.clip(w * 32, -127, 127) if dtype == jnp.int8 else w
        out.append((w.astype(dtype), jnp.full((n,), 0.01, jnp.float32)) if dtype != jnp.bfloat16
                   else (w.astype(dtype),))
    return out


def _gemm_calls(fn, x, w) -> str:
    """The GEMM custom calls (and transposes / copies of the weight) XLA compiled ``fn`` into."""
    text = jax.jit(fn).lower(x, *w).compile().as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    transposes = len(re.findall(r"= [a-z0-9]+\[[0-9,]+\]\{[0-9,]+\} (?:transpose|copy)\(", text))
    return f"{','.join(calls) or 'no custom call'}; {transposes} transpose/copy ops"


def main(argv):
    del argv
    key = jax.random.key(0)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| projection | M | bf16 [K,N] µs | " + " | ".join(
        f"{s} [K,N] µs | {s} [N,K] µs | {s} kernel µs" for s in _STORAGE.value) + " | best 8-bit vs bf16 |")
    print("|---|---|---|" + "---|---|---|" * len(_STORAGE.value) + "---|")
    for name in _SHAPES.value:
        k, n = SHAPES[name]
        copies16 = max(2, math.ceil(_MIN_BYTES.value / (2 * k * n)))
        copies8 = max(2, math.ceil(_MIN_BYTES.value / (k * n)))
        w16 = _weights(key, k, n, jnp.bfloat16, False, copies16)
        w8 = {(s, nk): _weights(key, k, n, DTYPES[s], nk, copies8) for s in _STORAGE.value for nk in (False, True)}
        for m in map(int, _MS.value):
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            base = time_chained_ms(bf16_kn, x, w16) * 1e3
            if m == int(_MS.value[0]):
                for s in _STORAGE.value:
                    for nk in (False, True):
                        print(f"  {name} {s} {'[N,K]' if nk else '[K,N]'}: {_gemm_calls(_w8a8(s, nk), x, w8[(s, nk)][0])}")
            cells, best = [], math.inf
            for s in _STORAGE.value:
                for nk in (False, True):
                    us = time_chained_ms(_w8a8(s, nk), x, w8[(s, nk)]) * 1e3
                    best = min(best, us)
                    cells.append(f"{us:.1f}")
                if m > SMALL_M_MAX or not w8mm.supports(m, k, n, DTYPES[s]) or jax.default_backend() != "gpu":
                    cells.append("-")
                    continue
                us = time_chained_ms(_w8a8_kernel(s), x, w8[(s, True)]) * 1e3
                best = min(best, us)
                cells.append(f"{us:.1f}")
            print(f"| {name} {k}→{n} | {m} | {base:.1f} | " + " | ".join(cells) + f" | {base / best:.2f}× |",
                  flush=True)
        del w16, w8


if __name__ == "__main__":
    app.run(main)
