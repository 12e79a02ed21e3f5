"""Kernel benchmark: our Pallas kernels vs XLA, cuDNN and JAX's own Pallas ops, against rooflines.

Owns: measuring the two ceilings of the card (HBM copy bandwidth counting bytes read + written,
XLA bf16 matmul rate at 8192^3) and timing each kernel of ``pallas_kernels`` at GLM-4-9B shapes.
It does not own the kernels or their tuning tables.

Run on a GPU machine:  PYTHONPATH=. python3 benchmarks/kernels.py [--out results.md] [--quick]
fp8 KV cache vs bf16:  PYTHONPATH=. python3 benchmarks/kernels.py --only ceilings,fp8kv --decode_cases 64x4096,512x1024
Decode attention only: PYTHONPATH=. python3 benchmarks/kernels.py --only ceilings,decode \
                           --decode_cases 64x4096,64x1024,8x4096 --decode_sweep ws   (all | ws | none)
On CPU, end to end:    PYTHONPATH=. python3 benchmarks/kernels.py --tiny --only ceilings,decode
                       (tiny decode case and ceilings, kernels in the Mosaic GPU interpreter; a smoke check)
Times are medians of wall time per call over queued asynchronous calls (see ``time_ms``); the
XLA pre/post-processing around a Pallas kernel is included. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import matmul as mm
from _timing import copy_bandwidth, time_ms
from pallas_kernels import quantized_matmul as qm
from pallas_kernels import tuning
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels._interpret import gpu_interpret
from tests.kernels.test_ragged_paged_attention import make_case

ROWS: list[dict] = []




def record(group: str, what: str, impl: str, ms: float | None, *, nbytes: float = 0, flops: float = 0,
           roofline_ms: float | None = None, note: str = ""):
    row = dict(group=group, what=what, impl=impl, ms=ms, nbytes=nbytes, flops=flops, roofline_ms=roofline_ms, note=note)
    ROWS.append(row)
    if ms is None:
        print(f"[{group}] {what} {impl}: n/a {note}", flush=True)
    else:
        roof = f"{roofline_ms / ms:.2f}" if roofline_ms else "-"
        print(f"[{group}] {what} {impl}: {ms * 1e3:.1f} us  {nbytes / ms / 1e6:.0f} GB/s  {flops / ms / 1e9:.1f} TFLOP/s "
              f"of roofline {roof} {note}", flush=True)


def attempt(group, what, impl, fn, *args, iterations: int = 20, **kw):
    try:
        ms = time_ms(fn, *args, iterations=iterations)
    except Exception as e:  # a baseline that does not run on this card/version is recorded, not fatal
        traceback.print_exc(limit=2)
        record(group, what, impl, None, note=f"fails: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:90]}")
        return None
    record(group, what, impl, ms, **kw)
    return ms


def ceilings(tiny: bool = False) -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) of the card: a 1 GiB copy and an 8192^3 matmul (--tiny: 2 MiB, 256^3)."""
    elements, n = (1 << 20, 256) if tiny else (1 << 29, 8192)
    nbytes = 2 * elements
    bandwidth = copy_bandwidth(nbytes) / 1e9  # GB/s read + written
    ms = 2 * nbytes / bandwidth / 1e6
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.bfloat16)
    ms_mm = time_ms(jax.jit(jnp.dot), a, a)
    tflops = 2 * n ** 3 / ms_mm / 1e9
    record("ceiling", f"HBM copy {nbytes >> 20} MiB (read+write)", "XLA", ms, nbytes=2 * nbytes)
    record("ceiling", f"bf16 matmul {n}^3", "XLA/cuBLAS", ms_mm, flops=2 * n ** 3)
    print(f"ceilings: copy {bandwidth:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s", flush=True)
    return bandwidth, tflops


def xla_paged_attention(q, k_cache, v_cache, layer, seq_ids, positions, page_table, *_, sm_scale):
    """Plain XLA baseline in bf16: gather each sequence's pages, dense masked GQA attention."""
    num_tok, num_q, head_dim = q.shape
    _, _, page_size, num_kv, _ = k_cache.shape
    ctx = page_table.shape[1] * page_size
    k = k_cache[layer][page_table].reshape(-1, ctx, num_kv, head_dim)[seq_ids]  # [T, ctx, Nkv, D]
    v = v_cache[layer][page_table].reshape(-1, ctx, num_kv, head_dim)[seq_ids]
    qg = q.reshape(num_tok, num_kv, num_q // num_kv, head_dim)
    s = jnp.einsum("tkgd,tckd->tkgc", qg, k, preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where((jnp.arange(ctx)[None, :] <= positions[:, None])[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("tkgc,tckd->tkgd", p, v).reshape(num_tok, num_q, head_dim)


DECODE_CASES = ((64, 4096), (64, 1024), (8, 4096), (1, 4096))  # (batch, context)
TINY_DECODE_CASES = ((2, 256),)
ONE_WARPGROUP_SHAPES = ((64, 2), (64, 4), (128, 2), (128, 3))  # (block_kv, stages) of the sweep
WARP_SPECIALIZED_SHAPES = ((64, 2), (64, 4), (64, 6), (128, 2), (128, 3))


def decode_configs(batch: int, context: int, num_kv_heads: int = 2, head_dim: int = 128,
                   consumers: tuple[int, ...] = (0, 1, 2)) -> list:
    """The decode-attention sweep, one token per CTA (block_q=1), configs that fit SMEM on the GPU. One
    warpgroup (consumer_warpgroups 0): KV block / stage / split choices keeping 1/4 .. 4 waves of CTAs. Warp-
    specialized (1 or 2 consumer warpgroups; stages a multiple of them): deeper rings, split-K at the most
    splits whose CTAs fit one wave and at half of that."""
    configs, sms = [], tuning.num_sms()
    one_wave = max(1, sms // (batch * num_kv_heads))
    for consumer_wgs in consumers:
        shapes = WARP_SPECIALIZED_SHAPES if consumer_wgs else ONE_WARPGROUP_SHAPES
        for block_kv, stages in shapes:
            if consumer_wgs and stages % consumer_wgs:
                continue
            all_splits = sorted({one_wave, max(1, one_wave // 2)}) if consumer_wgs else (1, 2, 4, 8, 16, 32, 64)
            for splits in all_splits:
                ctas = batch * num_kv_heads * splits
                cfg = rpa.AttentionConfig(block_kv=block_kv, num_stages=stages, num_kv_splits=splits, block_q=1,
                                          consumer_warpgroups=consumer_wgs)
                waves_ok = consumer_wgs or sms // 4 <= ctas <= 4 * sms
                if waves_ok and context >= splits * block_kv and \
                        rpa.smem_bytes(cfg, head_dim, p_via_smem=False, max_pages=context // 16) <= rpa.SMEM_BUDGET:
                    configs.append(cfg)
    return configs


def one_warpgroup_default(config):
    """The decode default before the warp-specialized kernel: the same KV block and splits, one warpgroup."""
    return rpa.AttentionConfig(block_kv=config.block_kv, num_stages=2, num_kv_splits=config.num_kv_splits, block_q=1)


def bench_decode_attention(bandwidth: float, cases=DECODE_CASES, page_size: int = 16, sweep: str = "all",
                           tiny: bool = False):
    """Decode attention (one token per sequence, GLM-4 heads) per (batch, context): the default config, the
    one-warpgroup default it replaced, the densest-packing heuristic of before, a config sweep (``sweep``: "all",
    "ws" = warp-specialized configs only, "none") and the baselines at batch 64 x 4k. "of roofline" is the fraction
    of the copy bandwidth. Small cases are timed over several layers in one program (distinct KV, together > L2),
    per-call time. ``tiny``: one layer, one timed call per batch, one warp-specialized config (the interpreter)."""
    iterations = 1 if tiny else 20
    for batch, context in cases:
        kv_bytes = 2 * batch * context * 2 * 128 * 2
        layers = 1 if tiny else max(1, min(32, -(-200_000_000 // kv_bytes)))
        lens = np.full(batch, context)
        args = make_case(lens - 1, np.ones(batch, np.int64), num_q_heads=32, num_kv_heads=2, head_dim=128,
                         page_size=page_size, token_bucket=batch, max_pages=context // page_size, seed=0,
                         num_layers=layers)
        roof = kv_bytes / bandwidth / 1e6
        what = f"decode attention {batch}x{context}, 32q/2kv, page {page_size}"

        def timed(cfg):
            def run(*a):
                return [rpa.ragged_paged_attention(a[0], a[1], a[2], jnp.int32(i), *a[4:], sm_scale=128 ** -0.5,
                                                   config=cfg, decode_only=True) for i in range(layers)]
            return jax.jit(run)

        def attempt_per_layer(impl, fn, **kw):
            ms = attempt("attention", what, impl, fn, *args, nbytes=kv_bytes * layers, roofline_ms=roof * layers,
                         iterations=iterations, **kw)
            if ms is not None:  # per call
                ROWS[-1].update(ms=ms / layers, nbytes=kv_bytes, roofline_ms=roof)
            return ms

        default = rpa.default_config(batch, 32, 2, 128, page_size, context, jnp.bfloat16, decode=True)
        attempt_per_layer(f"ours, default config {default}", timed(None))
        attempt_per_layer("ours, one warpgroup (default before)", timed(one_warpgroup_default(default)))
        if not tiny:
            old = rpa.default_config(batch, 32, 2, 128, page_size, context, jnp.bfloat16)  # densest packing
            attempt_per_layer(f"ours, densest packing (before) {old}", timed(old))
        configs = {"all": decode_configs(batch, context), "ws": decode_configs(batch, context, consumers=(1, 2)),
                   "none": []}[sweep]
        if tiny:
            configs = [c for c in configs if c.consumer_warpgroups == 2][:1]
        for cfg in configs:
            attempt_per_layer(f"ours bq=1 wgs={cfg.consumer_warpgroups} splits={cfg.num_kv_splits} "
                              f"bkv={cfg.block_kv} stages={cfg.num_stages}", timed(cfg))
        if (batch, context) != (64, 4096):
            continue
        xla = jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=128 ** -0.5))
        attempt("attention", what, "XLA gather + dense", xla, *args, nbytes=kv_bytes, roofline_ms=roof)
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

            q, k_cache, v_cache, _, _, _, page_table, context_lens, *_ = args
            k_pages = jnp.transpose(k_cache[0], (2, 0, 1, 3))  # [Nkv, P, ps, D]
            v_pages = jnp.transpose(v_cache[0], (2, 0, 1, 3))
            f = jax.jit(lambda q, k, v, pt, cl: jax_paged.paged_attention(q, k, v, pt, cl, k_splits=16))
            attempt("attention", what, "JAX Pallas Triton paged_attention", f, q, k_pages, v_pages, page_table,
                    context_lens, nbytes=kv_bytes, roofline_ms=roof)
        except Exception as e:
            record("attention", what, "JAX Pallas Triton paged_attention", None, note=f"fails: {e}"[:100])


def bench_prefill_attention(matmul_tflops: float, tokens: int = 4096):
    args = make_case([0], [tokens], num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=16,
                     token_bucket=tokens, max_pages=tokens // 16, seed=1, num_layers=1)
    flops = 4 * tokens * tokens * 32 * 128 / 2  # causal
    roof = flops / matmul_tflops / 1e9
    what = f"causal prefill attention {tokens} tokens, 32q/2kv, d128"
    ours = jax.jit(lambda *a: rpa.ragged_paged_attention(*a, sm_scale=128 ** -0.5))
    attempt("attention", what, "ours (paged)", ours, *args, flops=flops, roofline_ms=roof)
    q = args[0][None]
    k = jax.random.normal(jax.random.key(2), (1, tokens, 2, 128), jnp.float32).astype(jnp.bfloat16)
    for impl in ("cudnn", "xla"):
        f = jax.jit(lambda q, k, impl=impl: jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation=impl))
        attempt("attention", what, f"jax.nn.dot_product_attention {impl} (contiguous)", f, q, k, flops=flops, roofline_ms=roof)


FP8_KV_DECODE_CONFIGS = tuple(rpa.AttentionConfig(block_kv=bkv, num_stages=st, block_q=1, consumer_warpgroups=c)
                              for c, bkv, st in ((1, 128, 3), (1, 128, 4), (1, 64, 6), (2, 128, 2), (2, 64, 4)))
FP8_KV_PREFILL_CONFIGS = ((64, 2, 2), (64, 2, 1))  # (block_kv, num_stages, narrow_stages) besides the default


def bench_fp8_kv_attention(bandwidth: float, matmul_tflops: float, cases, page_size: int = 16, variants=()):
    """Both attention kernels on a bf16 vs an fp8 (e4m3) KV cache, same shapes, GLM-4 heads: decode steps per
    (batch, context) (defaults, then a few warp-specialized fp8 configs with the split-K of the default), and a
    prefill through the prefill kernel (4k tokens from scratch; a 1k chunk over a 3k prefix). Decode "of
    roofline": the step's K/V bytes in the cache's dtype over the copy bandwidth. ``variants``: ("q" | "f16",
    layout name) pairs of ``rpa.NARROW_COMPUTE`` / ``rpa.NARROW_CONVERT_LAYOUT`` to time the fp8 rows under
    too (the module's setting first)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    default_variant = (rpa.NARROW_COMPUTE, rpa.NARROW_CONVERT_LAYOUT)
    for compute, layout in variants:
        rpa.NARROW_COMPUTE, rpa.NARROW_CONVERT_LAYOUT = compute, getattr(plgpu.Layout, layout)
        jax.clear_caches()  # the kernels read these at trace time
        _bench_fp8_kv_attention(bandwidth, matmul_tflops, cases, page_size, dtypes=(jnp.float8_e4m3fn,),
                                label=f" [{compute} / {layout}]")
    rpa.NARROW_COMPUTE, rpa.NARROW_CONVERT_LAYOUT = default_variant
    jax.clear_caches()
    _bench_fp8_kv_attention(bandwidth, matmul_tflops, cases, page_size)


def _bench_fp8_kv_attention(bandwidth, matmul_tflops, cases, page_size, dtypes=(jnp.bfloat16, jnp.float8_e4m3fn),
                            label=""):
    from pallas_kernels import ragged_prefill_attention as rpf

    fp8 = jnp.float8_e4m3fn
    with_cache = lambda case, dtype: (case[0], case[1].astype(dtype), case[2].astype(dtype), *case[3:])
    for batch, context in cases:
        lens = np.full(batch, context)
        bf16_args = make_case(lens - 1, np.ones(batch, np.int64), num_q_heads=32, num_kv_heads=2, head_dim=128,
                              page_size=page_size, token_bucket=batch, max_pages=context // page_size, seed=0,
                              num_layers=1)
        what = f"decode attention {batch}x{context}, 32q/2kv, page {page_size}"
        for dtype in dtypes:
            args = with_cache(bf16_args, dtype)
            kv_bytes = 2 * batch * context * 2 * 128 * jnp.dtype(dtype).itemsize
            default = rpa.default_config(batch, 32, 2, 128, page_size, context, jnp.bfloat16, decode=True,
                                         cache_dtype=dtype)
            configs = [None] + ([dataclasses.replace(c, num_kv_splits=default.num_kv_splits)
                                 for c in FP8_KV_DECODE_CONFIGS] if dtype == fp8 else [])
            for cfg in configs:
                f = jax.jit(functools.partial(rpa.ragged_paged_attention, sm_scale=128 ** -0.5, config=cfg,
                                              decode_only=True))
                name = f"default {default}" if cfg is None else f"wgs={cfg.consumer_warpgroups} bkv={cfg.block_kv} " \
                    f"stages={cfg.num_stages} splits={cfg.num_kv_splits}"
                attempt("fp8 kv", what, f"{jnp.dtype(dtype).name} cache{label}, {name}", f, *args, nbytes=kv_bytes,
                        roofline_ms=kv_bytes / bandwidth / 1e6)
    for before, tokens in ((0, 4096), (3072, 1024)):
        bf16_args = make_case([before], [tokens], num_q_heads=32, num_kv_heads=2, head_dim=128, page_size=page_size,
                              token_bucket=tokens, max_pages=-(-(before + tokens) // page_size), seed=1, num_layers=1)
        flops = 4 * tokens * (before + tokens / 2) * 32 * 128
        what = f"prefill attention {tokens} tokens over {before}, 32q/2kv, d128"
        for dtype in dtypes:
            args = with_cache(bf16_args, dtype)
            configs = [None] + ([rpf.PrefillAttentionConfig(block_kv=bkv, num_stages=st, narrow_stages=nst)
                                 for bkv, st, nst in FP8_KV_PREFILL_CONFIGS] if dtype == fp8 else [])
            for cfg in configs:
                f = jax.jit(functools.partial(rpf.ragged_prefill_attention, sm_scale=128 ** -0.5, config=cfg))
                attempt("fp8 kv", what, f"{jnp.dtype(dtype).name} cache{label}, prefill kernel "
                        f"{'default' if cfg is None else cfg}", f, *args, flops=flops, roofline_ms=flops / matmul_tflops / 1e9)


GLM4_SHAPES = {"qkv": (4096, 4608), "o_proj": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096),
               "lm_head": (4096, 151552)}


def bench_matmul(bandwidth: float, matmul_tflops: float, ms: tuple[int, ...], shapes=GLM4_SHAPES):
    for name, (k, n) in shapes.items():
        w = (jax.random.normal(jax.random.key(k + n), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        for m in ms:
            if name == "lm_head" and m > 256:
                continue
            a = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            nbytes, flops = 2 * (m * k + k * n + m * n), 2 * m * k * n
            roof = max(nbytes / bandwidth / 1e6, flops / matmul_tflops / 1e9)
            what = f"matmul {name} M={m} K={k} N={n}"
            attempt("matmul", what, "ours (Mosaic GPU)", mm.matmul, a, w, nbytes=nbytes, flops=flops, roofline_ms=roof)
            attempt("matmul", what, "XLA jnp.dot", jax.jit(jnp.dot), a, w, nbytes=nbytes, flops=flops, roofline_ms=roof)
            if m >= 256:
                from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

                cfg = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                                      grid_tile_width=8, wg_dimension=hm.MatmulDimension.N)
                attempt("matmul", what, "JAX hopper_matmul_mgpu", jax.jit(lambda a, w: hm.matmul(a, w, None, cfg)), a, w,
                        nbytes=nbytes, flops=flops, roofline_ms=roof)
        del w


def bench_quantized(bandwidth: float, ms: tuple[int, ...] = (1, 16, 64), k: int = 4096, n: int = 27392):
    w = (jax.random.normal(jax.random.key(5), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    w_nk = w.T
    scale = jnp.max(jnp.abs(w_nk.astype(jnp.float32)), axis=1) / 127
    quantized = {"int8": jnp.round(w_nk / scale[:, None]).astype(jnp.int8),
                 "fp8": (w_nk.astype(jnp.float32) / scale[:, None] * (448 / 127)).astype(jnp.float8_e4m3fn)}
    for m in ms:
        a = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        what = f"gate_up M={m} K={k} N={n}"
        bf16_ms = attempt("quantized", what, "bf16 ours", mm.matmul, a, w, nbytes=2 * k * n,
                          roofline_ms=2 * k * n / bandwidth / 1e6)
        for name, w_q in quantized.items():
            sc = scale if name == "int8" else scale * (127 / 448)
            roof = k * n / bandwidth / 1e6
            ms_q = attempt("quantized", what, f"{name} ours", qm.quantized_matmul, a, w_q, sc, nbytes=k * n, roofline_ms=roof,
                           note="")
            if ms_q and bf16_ms:
                ROWS[-1]["note"] = f"{bf16_ms / ms_q:.2f}x bf16 ours"
            xla = jax.jit(lambda a, w_q, sc: (jnp.dot(a, w_q.T.astype(jnp.bfloat16)) * sc).astype(jnp.bfloat16))
            attempt("quantized", what, f"{name} XLA dot(a, w.astype(bf16)) * s", xla, a, w_q, sc, nbytes=k * n,
                    roofline_ms=roof)


def table() -> str:
    lines = ["| kernel / shape | implementation | time (µs) | GB/s | TFLOP/s | of roofline | note |",
             "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if r["ms"] is None:
            lines.append(f"| {r['what']} | {r['impl']} | n/a | | | | {r['note']} |")
            continue
        gbs = f"{r['nbytes'] / r['ms'] / 1e6:,.0f}" if r["nbytes"] else ""
        tf = f"{r['flops'] / r['ms'] / 1e9:,.1f}" if r["flops"] else ""
        roof = f"{r['roofline_ms'] / r['ms']:.2f}" if r["roofline_ms"] else ""
        lines.append(f"| {r['what']} | {r['impl']} | {r['ms'] * 1e3:,.1f} | {gbs} | {tf} | {roof} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table (with card, jax version, command) here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--only", default="ceilings,decode,prefill,matmul,quantized",
                        help="parts, comma-separated; also fp8kv (both attention kernels on a bf16 vs fp8 cache)")
    parser.add_argument("--decode_cases", help="decode attention cases BATCHxCONTEXT, comma-separated "
                        "(default 64x4096,64x1024,8x4096,1x4096; --tiny: 2x256)")
    parser.add_argument("--decode_sweep", choices=("all", "ws", "none"), default="all",
                        help="decode config sweep: all, ws (warp-specialized configs only) or none")
    parser.add_argument("--fp8kv_variants", default="", help="fp8kv part: also time the fp8 rows under these "
                        "COMPUTE:LAYOUT conversion variants (rpa.NARROW_COMPUTE q|f16 : plgpu.Layout name), e.g. "
                        "q:WGMMA,f16:WGMMA_8BIT")
    parser.add_argument("--page_size", type=int, default=16, help="tokens per KV page of the decode and fp8kv "
                        "parts' caches (the engine's page_size; fewer, larger TMA copies per K / V block)")
    parser.add_argument("--tiny", action="store_true", help="tiny ceilings and decode case, kernels in the Mosaic "
                        "GPU interpreter (a CPU smoke check of the decode part)")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    cases = TINY_DECODE_CASES if args.tiny else DECODE_CASES
    if args.decode_cases:
        cases = tuple(tuple(int(n) for n in case.split("x")) for case in args.decode_cases.split(","))
    with gpu_interpret() if args.tiny else contextlib.nullcontext():
        run_parts(args, parts, cases, argv)


def run_parts(args, parts, cases, argv):
    bandwidth, tflops = ceilings(args.tiny)
    for part, fn in (("decode", lambda: bench_decode_attention(bandwidth, cases, page_size=args.page_size,
                                                               sweep=args.decode_sweep, tiny=args.tiny)),
                     ("quantized", lambda: bench_quantized(bandwidth, (1, 16) if args.quick else (1, 16, 64))),
                     ("matmul", lambda: bench_matmul(bandwidth, tflops, (1, 16) if args.quick else (1, 16, 256, 4096))),
                     ("prefill", lambda: bench_prefill_attention(tflops)),
                     ("fp8kv", lambda: bench_fp8_kv_attention(bandwidth, tflops, cases, page_size=args.page_size, variants=[
                         tuple(v.split(":")) for v in args.fp8kv_variants.split(",") if v]))):
        if part in parts:
            try:
                fn()
            except Exception:
                traceback.print_exc()
    card = jax.devices()[0].device_kind + (" (interpreter, --tiny)" if args.tiny else "")
    header = (f"Card: {card}; jax {jax.__version__}; "
              f"command: `PYTHONPATH=. python3 benchmarks/kernels.py {' '.join(argv or sys.argv[1:])}`; "
              f"ceilings: copy {bandwidth:,.0f} GB/s (read+write), bf16 matmul {tflops:,.0f} TFLOP/s.\n\n")
    emit(header, args.out)


def emit(header: str, out: str | None) -> None:
    """Prints ``header`` + the markdown table of the rows recorded so far, and writes it to ``out`` if given."""
    text = header + table()
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
