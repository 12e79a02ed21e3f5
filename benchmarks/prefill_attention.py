"""Prefill attention benchmark: the warp-specialized ragged prefill kernel vs the ragged paged kernel, cuDNN
and XLA, at GLM-4 heads (32 q / 2 kv, head dim 128, bf16; pages of 16 tokens unless --page_size), against the
bf16 matmul rate.

Owns: the prefill cases (one causal prefill of 4k / 8k / 16k tokens, one of 4,100 tokens (not a multiple of
the prefill kernel's 8 tokens a CTA: its wrapper pads q), two ~2k sequences in one batch with their boundary
inside a CTA tile, a 1k chunk on a 3k prefix), timing every implementation on each and
checking each kernel's output against cuDNN (or, with --tiny, the float32 reference). It does not own the
kernels or their tuning tables. FLOPs count the visible (query, key) pairs: 4 * Nq * D * sum_t (pos_t + 1),
i.e. 2 * 2 * T * T * Nq * D / 2 for one causal prefill of T tokens.

The "serving mixed step" case is the offline benchmark's typical 2,048-token step (two prefill chunks and 213
decode tokens at 1.0-2.0k context): the engine sends all of it to the prefill kernel, whose CTAs (8 tokens x one
KV head) walk the KV of every sequence among their tokens one after another. (Session 10 also timed the decode
tokens split off to the decode kernel, vLLM's and SGLang's decode/prefill split: 0.253 ms against 0.215 ms for
the prefill kernel alone on an H100; the split was removed, RESULTS.md has the row.)

cuDNN and XLA run on contiguous q / k / v built from the paged cache ([B, S, H, D]); the chunk uses an
explicit bottom-right causal mask (cuDNN's built-in causal mask is top-left aligned), the two sequences a
batch of 2 padded to the longer one. XLA is skipped past 8k tokens (its [Nq, T, T] scores).

Run on a GPU machine:  PYTHONPATH=. python3 benchmarks/prefill_attention.py [--out results.md] [--nosweep]
                       [--only 'prefill 4096,1k chunk'] [--sweep_configs 64:3,128:2:nobarrier,128:2:noauto] [--page_size 64]
On CPU, end to end:    PYTHONPATH=. python3 benchmarks/prefill_attention.py --tiny   (tiny shapes, interpreter)
Times are medians of wall time per call over queued asynchronous calls (``_timing.time_ms``), XLA pre- and
post-processing around the Pallas kernels included (the prefill kernel reads q / writes out in [T, Nq, D]
itself; the one-warpgroup kernel's GQA packing runs in XLA). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from _timing import time_ms
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_prefill_attention as rpf
from pallas_kernels._interpret import gpu_interpret
from tests.kernels.test_ragged_paged_attention import make_case

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 2, 128, 16  # PAGE_SIZE: the default of --page_size
SM_SCALE = HEAD_DIM ** -0.5
XLA_MAX_TOKENS = 8192
SWEEP = [rpf.PrefillAttentionConfig(block_kv=bkv, num_stages=stages, schedule_barrier=barrier)
         for bkv, stages in ((128, 2), (64, 2), (64, 3), (64, 4)) for barrier in (True, False)]


def parse_configs(text: str) -> list[rpf.PrefillAttentionConfig]:
    """--sweep_configs: comma-separated BLOCK_KV:STAGES[:nobarrier][:noauto], e.g. "64:3,128:2:nobarrier,128:2:noauto"
    (nobarrier: no ping-pong schedule barrier; noauto: ``auto_barriers=False``)."""
    configs = []
    for item in text.split(","):
        block_kv, stages, *rest = item.split(":")
        if len(set(rest)) != len(rest) or not set(rest) <= {"nobarrier", "noauto"}:
            raise ValueError(f"bad sweep config {item!r}: BLOCK_KV:STAGES[:nobarrier][:noauto]")
        configs.append(rpf.PrefillAttentionConfig(block_kv=int(block_kv), num_stages=int(stages),
                                                  schedule_barrier="nobarrier" not in rest,
                                                  auto_barriers="noauto" not in rest))
    return configs


def cases(tiny: bool) -> list[tuple[str, list[int], list[int]]]:
    """(name, tokens already cached per sequence, new tokens per sequence)."""
    if tiny:
        return [("causal prefill 32", [0], [32]), ("2 sequences 13 + 18 (q padded)", [0, 0], [13, 18]),
                ("16-token chunk on a 48 prefix", [48], [16]), mixed_case(tiny)]
    return [*((f"causal prefill {t}", [0], [t]) for t in (4096, 8192, 16384)),
            ("causal prefill 4100 (q padded)", [0], [4100]),
            ("2 sequences 2045 + 2051 (boundary mid-tile)", [0, 0], [2045, 2051]),
            ("1k chunk on a 3k prefix", [3072], [1024]), mixed_case(tiny)]


def mixed_case(tiny: bool) -> tuple[str, list[int], list[int]]:
    """The serving mixed step (module docstring): two prefill chunks, then single decode tokens."""
    rng = np.random.default_rng(7)
    if tiny:
        return ("serving mixed step (tiny): 2 chunks + 6 decodes", [16, 0] + list(rng.integers(8, 64, 6)),
                [12, 20] + [1] * 6)
    return ("serving mixed step: 832 + 1,000 prefill + 213 decodes at 1-2k", [168, 0] + list(rng.integers(1000, 2000, 213)),
            [832, 1000] + [1] * 213)


def contiguous_qkv(args, before, new):
    """The case as [B, S, H, D] batches for jax.nn.dot_product_attention, with a bottom-right causal mask
    when any sequence has cached tokens (None: plain causal)."""
    q, k_cache, v_cache, layer, _, _, page_table, *_ = args
    new_max, ctx_max = max(new), max(b + n for b, n in zip(before, new))
    starts = np.cumsum([0] + list(new))
    qs, ks, vs = [], [], []
    for row, (b, n) in enumerate(zip(before, new)):
        pages = page_table[row]
        k = k_cache[layer][pages].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:b + n]
        v = v_cache[layer][pages].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:b + n]
        qs.append(jnp.pad(q[starts[row]:starts[row] + n], ((0, new_max - n), (0, 0), (0, 0))))
        ks.append(jnp.pad(k, ((0, ctx_max - b - n), (0, 0), (0, 0))))
        vs.append(jnp.pad(v, ((0, ctx_max - b - n), (0, 0), (0, 0))))
    mask = None
    if any(before):  # query i of a chunk sits at position before + i
        assert len(before) == 1, "chunk cases have one sequence"
        mask = (jnp.arange(ctx_max)[None, :] <= before[0] + jnp.arange(new_max)[:, None])[None, None]
    return jnp.stack(qs), jnp.stack(ks), jnp.stack(vs), mask


def unbatch(out, new):
    """[B, S, Nq, D] -> [T, Nq, D] (the flat token order of the kernels)."""
    return jnp.concatenate([out[row, :n] for row, n in enumerate(new)])


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


class Bench:
    """Times implementations and collects the table's rows."""

    def __init__(self, iterations: int):
        self.iterations, self.rows = iterations, []

    def time(self, case: str, impl: str, fn, args, flops: float, ceiling: float) -> tuple[float | None, object]:
        try:
            out = jax.block_until_ready(fn(*args))
            ms = time_ms(fn, *args, iterations=self.iterations)
        except Exception as e:  # a baseline that does not run on this card / version is recorded, not fatal
            traceback.print_exc(limit=2)
            self.rows.append(dict(case=case, impl=impl, ms=None, note=f"fails: {type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:90]}"))
            return None, None
        tflops = flops / ms / 1e9
        self.rows.append(dict(case=case, impl=impl, ms=ms, tflops=tflops, of_ceiling=tflops / ceiling, note=""))
        print(f"[{case}] {impl}: {ms:.3f} ms  {tflops:.1f} TFLOP/s", flush=True)
        return ms, out

    def note(self, text: str):
        self.rows[-1]["note"] = (self.rows[-1]["note"] + "; " + text).strip("; ")

    def emit(self, header: str, out: str | None):
        """Prints ``header`` + the table, and writes it to ``out`` if given."""
        text = header + self.table()
        print(text)
        if out:
            with open(out, "w") as f:
                f.write(text + "\n")

    def table(self) -> str:
        lines = ["| case | implementation | time (ms) | TFLOP/s | of bf16 matmul | vs cuDNN | note |",
                 "|---|---|---|---|---|---|---|"]
        cudnn = {r["case"]: r["ms"] for r in self.rows if r["impl"].startswith("cuDNN") and r["ms"]}
        for r in self.rows:
            if r["ms"] is None:
                lines.append(f"| {r['case']} | {r['impl']} | n/a | | | | {r['note']} |")
                continue
            vs = f"{cudnn[r['case']] / r['ms']:.2f}x" if r["case"] in cudnn else ""
            lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:,.3f} | {r['tflops']:,.1f} | {r['of_ceiling']:.2f} "
                         f"| {vs} | {r['note']} |")
        return "\n".join(lines)


def matmul_ceiling(bench: Bench, n: int) -> float:
    """bf16 XLA matmul rate (TFLOP/s) at n^3, measured in this run."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.bfloat16)
    ms = time_ms(jax.jit(jnp.dot), a, a, iterations=bench.iterations)
    tflops = 2 * n ** 3 / ms / 1e9
    bench.rows.append(dict(case="ceiling", impl=f"bf16 matmul {n}^3 (XLA)", ms=ms, tflops=tflops, of_ceiling=1.0,
                           note=""))
    return tflops


def bench_case(bench: Bench, ceiling: float, name: str, before: list[int], new: list[int],
               sweep: list[rpf.PrefillAttentionConfig], tiny: bool, page_size: int = PAGE_SIZE,
               sweep_all: bool = False):
    total = sum(new)
    args = make_case(before, new, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                     page_size=page_size, token_bucket=total,
                     max_pages=-(-max(b + n for b, n in zip(before, new)) // page_size), seed=len(bench.rows),
                     num_layers=1)
    positions = np.asarray(args[5])
    flops = 4 * NUM_Q_HEADS * HEAD_DIM * float((positions[:total] + 1).sum())
    # cuDNN / XLA on contiguous batches: single sequences or a few fresh prefills (a mixed step would pad
    # every sequence to the longest, and its chunks need per-sequence bottom-right masks)
    baselines = len(new) == 1 or (len(new) <= 8 and not any(before))
    q, k, v, mask = contiguous_qkv(args, before, new) if baselines else (None,) * 4
    # --tiny: the float32 reference (a dense [T, ctx] gather, small shapes only) checks every implementation;
    # else the first baseline that runs checks the kernels.
    ref = rpa.ragged_paged_attention_reference(*args, sm_scale=SM_SCALE) if tiny else None
    for impl in ("cudnn", "xla") if baselines else ():
        if impl == "xla" and max(b + n for b, n in zip(before, new)) > XLA_MAX_TOKENS:
            continue
        fn = jax.jit(lambda q, k, v, mask, impl=impl: jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=SM_SCALE, is_causal=mask is None, implementation=impl))
        label = f"{'cuDNN' if impl == 'cudnn' else 'XLA'} jax.nn.dot_product_attention (contiguous"
        _, out = bench.time(name, label + (", mask)" if mask is not None else ", causal)"), fn, (q, k, v, mask),
                            flops, ceiling)
        if out is not None and tiny:
            bench.note(f"rel err {rel_err(unbatch(out, new), ref):.1e} vs f32 reference")
        elif out is not None and ref is None:
            ref = unbatch(out, new)

    def kernel(label, fn):
        _, out = bench.time(name, label, jax.jit(fn), args, flops, ceiling)
        if out is not None and ref is not None:
            err = rel_err(out, ref)
            against = "f32 reference" if tiny else "baseline"
            bench.note(f"rel err {err:.1e} vs {against}{' MISMATCH' if err > 2e-2 else ''}")

    default = rpf.default_config(total, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, page_size,
                                 args[6].shape[1] * page_size, jnp.bfloat16)
    kernel(f"ragged_prefill_attention default {default}",
           lambda *a: rpf.ragged_prefill_attention(*a, sm_scale=SM_SCALE))
    for config in sweep if tiny or sweep_all or (len(new) == 1 and not any(before)) else ():
        if config != default:
            kernel(f"ragged_prefill_attention {config}",
                   lambda *a, config=config: rpf.ragged_prefill_attention(*a, sm_scale=SM_SCALE, config=config))
    kernel("ragged_paged_attention (one warpgroup) default",
           lambda *a: rpa.ragged_paged_attention(*a, sm_scale=SM_SCALE))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table (with card, jax version, command) here")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, one sweep config, in the Mosaic GPU interpreter (a CPU check, ~2 min)")
    parser.add_argument("--nosweep", action="store_true", help="only the default configs (else a config sweep on "
                        "the single-prefill cases)")
    parser.add_argument("--sweep_configs", help="the sweep's configs, BLOCK_KV:STAGES[:nobarrier][:noauto] comma-separated, "
                        "run on every case "
                        "(default: block_kv 128 x 2 stages, 64 x 2 / 3 / 4, each with and without the barrier)")
    parser.add_argument("--only", help="comma-separated substrings: run the cases whose name contains one")
    parser.add_argument("--page_size", type=int, default=PAGE_SIZE,
                        help="tokens per KV page of the paged kernels' cache (the engine's page_size; cuDNN and XLA "
                        "read contiguous K / V either way). Larger pages mean fewer TMA copies per K / V block")
    args = parser.parse_args(argv)
    sweep = parse_configs(args.sweep_configs) if args.sweep_configs else SWEEP[2:3] if args.tiny else SWEEP
    sweep = [] if args.nosweep else sweep
    bench = Bench(iterations=1 if args.tiny else 20)
    with gpu_interpret() if args.tiny else contextlib.nullcontext():
        ceiling = matmul_ceiling(bench, 256 if args.tiny else 8192)
        for name, before, new in cases(args.tiny):
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            try:
                bench_case(bench, ceiling, name, before, new, sweep=sweep, tiny=args.tiny, page_size=args.page_size,
                           sweep_all=bool(args.sweep_configs))
            except Exception:
                traceback.print_exc()
    card = jax.devices()[0].device_kind + (" (interpreter, --tiny)" if args.tiny else "")
    header = (f"Card: {card}; jax {jax.__version__}; "
              f"GLM-4 heads {NUM_Q_HEADS} q / {NUM_KV_HEADS} kv, D {HEAD_DIM}, page {args.page_size}, bf16; command: "
              f"`PYTHONPATH=. python3 benchmarks/prefill_attention.py {' '.join(argv or sys.argv[1:])}`; "
              f"bf16 matmul ceiling {ceiling:,.1f} TFLOP/s.\n\n")
    bench.emit(header, args.out)


if __name__ == "__main__":
    main()
