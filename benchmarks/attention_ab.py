"""Decode attention A/B: the working tree's ``ragged_paged_attention`` against the same file at an earlier git
revision, in one process on one card, with two clocks.

Owns: one comparison. The baseline module is read with ``git show REV:pallas_kernels/ragged_paged_attention.py``
and imported under another name (it shares the tree's helpers: ``tuning``, ``_interpret``, ``_smem``). Each
case (batch x context, GLM-4 heads 32 q / 2 kv, D 128, pages of 16, one decode token per sequence) is timed
(a) as wall time per queued call, the best of 3 medians (``_timing.time_ms``: includes dispatch, so cases
under ~60 µs measure the host, not the card), and (b) as the summed device time of the call's kernels in a
profiler trace (``_timing.kernel_time_ms``: the kernel plus the XLA work around it, no launch gaps). Both as a
fraction of the copy bandwidth measured in the same run.

Run: ``JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/attention_ab.py --baseline_rev=58bf335``
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

from benchmarks._timing import copy_bandwidth, kernel_time_ms, time_ms
from pallas_kernels import ragged_paged_attention as rpa
from tests.kernels.test_ragged_paged_attention import make_case

_REV = flags.DEFINE_string("baseline_rev", "HEAD", "git revision of the baseline kernel file")
_CASES = flags.DEFINE_list("cases", ["64x4096", "64x2048", "32x4096", "8x4096", "1x1024"], "BATCHxCONTEXT")
PATH = "pallas_kernels/ragged_paged_attention.py"


def baseline_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:{PATH}"], check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("rpa_baseline", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rpa_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def candidates(base):
    """(name, module, config or None = that module's default) of the comparison."""
    config = rpa.AttentionConfig
    return [(f"baseline {_REV.value} default", base, None),
            ("tree default", rpa, None),
            ("tree one warpgroup 128x2", rpa, config(block_kv=128, num_stages=2, num_kv_splits=1, block_q=1)),
            ("tree warp-specialized 1 consumer 128x2", rpa,
             config(block_kv=128, num_stages=2, num_kv_splits=1, block_q=1, consumer_warpgroups=1)),
            ("tree warp-specialized 1 consumer 128x3", rpa,
             config(block_kv=128, num_stages=3, num_kv_splits=1, block_q=1, consumer_warpgroups=1)),
            ("tree warp-specialized 2 consumers 64x4", rpa,
             config(block_kv=64, num_stages=4, num_kv_splits=1, block_q=1, consumer_warpgroups=2))]


def main(argv):
    del argv
    base = baseline_module(_REV.value)
    bandwidth = copy_bandwidth()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    print("| case | implementation | wall µs | of copy bw | kernels µs | of copy bw |")
    print("|---|---|---|---|---|---|")
    for case in _CASES.value:
        batch, context = map(int, case.split("x"))
        args = make_case(np.full(batch, context) - 1, np.ones(batch, np.int64), num_q_heads=32, num_kv_heads=2,
                         head_dim=128, page_size=16, token_bucket=batch, max_pages=context // 16, seed=0,
                         num_layers=1)
        kv_bytes = 2 * batch * context * 2 * 128 * 2
        for name, module, config in candidates(base):
            fn = jax.jit(lambda *a, m=module, c=config: m.ragged_paged_attention(
                *a, sm_scale=128 ** -0.5, config=c, decode_only=True))
            try:
                wall = min(time_ms(fn, *args, iterations=50) for _ in range(3))
                kernels = kernel_time_ms(fn, *args, iterations=30)
            except Exception as e:  # a config the baseline does not know, or that does not fit
                print(f"| {case} | {name} | failed: {str(e).splitlines()[0][:80]} | | | |", flush=True)
                continue
            print(f"| {case} | {name} | {wall * 1e3:.1f} | {kv_bytes / (wall / 1e3) / bandwidth:.3f} | "
                  f"{kernels * 1e3:.1f} | {kv_bytes / (kernels / 1e3) / bandwidth:.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
