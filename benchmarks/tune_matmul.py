"""Tune the small-M (decode) matmul kernels and the bf16 large-M (prefill) kernel on this GPU and write the tuning tables.

Owns: sweeping ``matmul``'s, ``quantized_matmul``'s, ``int4_matmul``'s and ``w8a8_matmul``'s small-M configs
(tile_n, tile_k, pipeline depth, split-K) at the GLM-4-9B projection shapes and decode token counts, and
bf16 ``matmul``'s large-M configs (M > 128: tile_m, tile_n, tile_k, pipeline depth, split-K) at prefill
token counts, timing each candidate the way a decoder calls it (``time_chained_ms``: distinct weights per call inside one
program), and writing the best per (card, dtype, shape key) to ``pallas_kernels/tuning/<kernel>.json``
(merged with entries for other cards), with its time and XLA's (``kernel_us``, ``xla_us``: the "auto" matmul
backend runs a bf16 kernel only where it was measured faster; ``--from_table`` re-times a card's tabled config). Also prints each winner against XLA's dot (int4: dequantize + dot;
W8A8: the model's XLA rule, per-token quantization + 8-bit dot on the [N, K] weight) at the same shape.
dtypes: bfloat16, int8, float8_e4m3fn (weight-only), int4-g64, int4-g128 (= int4), w8a8-fp8, w8a8-int8
(timed with the per-token activation quantization the model runs before the kernel).

Run on a GPU:  PYTHONPATH=. python3 benchmarks/tune_matmul.py [--ms=1,16,64] [--dtypes=bfloat16,int8,float8_e4m3fn]
               [--shapes=qkv,o_proj,gate_up,down] [--sweep] [--from_table] [--write] [--out results.json]
Tables from a GPU run's --out files, on any machine:  ... --write_from results.json[,more.json]
Large M (prefill, bfloat16 only):  ... --dtypes=bfloat16 --ms=256,512,1024 --sweep --write
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from _timing import chain, copy_bandwidth, time_chained_ms, time_ms
from autoglm_jax.quant.channel import STORAGE, quantize_activations, w8a8_product
from pallas_kernels import int4_matmul as i4
from pallas_kernels import matmul as mm
from pallas_kernels import quantized_matmul as qm
from pallas_kernels import tuning
from pallas_kernels import w8a8_matmul as w8

SHAPES = {"qkv": (4096, 4608), "o_proj": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096),
          "lm_head": (4096, 151552)}
L2_BYTES = 50 << 20
CHAIN_BYTES = 1 << 30  # weights one timed program streams (tune_one)
LARGE_M_STAGES, LARGE_M_SPLITS = (3, 4), (1, 2, 3, 4)  # the large-M sweep's defaults (small M: --stages / --splits)


def group_size(dtype: str) -> int:
    """The int4 group size of ``dtype`` ("int4" = "int4-g128"), 0 for the other dtypes."""
    return int(dtype.removeprefix("int4").removeprefix("-g") or 128) if dtype.startswith("int4") else 0


def w8a8_activations(dtype: str) -> str | None:
    """The W8A8 activation type of ``dtype`` ("w8a8-fp8" -> "fp8"), None for the other dtypes."""
    return dtype.removeprefix("w8a8-") if dtype.startswith("w8a8-") else None


def weight_dtype(dtype: str) -> str:
    """The weights' storage dtype name (W8A8: its 8-bit type)."""
    return jnp.dtype(STORAGE[w8a8_activations(dtype)][0]).name if w8a8_activations(dtype) else dtype


def itemsize(dtype: str) -> float:
    """Bytes the kernel streams per weight (int4: half a byte and the group's f32 scale)."""
    return i4.weight_itemsize(group_size(dtype)) if group_size(dtype) else jnp.dtype(weight_dtype(dtype)).itemsize


def activation_itemsize(dtype: str) -> int:
    """Bytes per token element in the kernel's SMEM (W8A8: one)."""
    return 1 if w8a8_activations(dtype) else 2


def weights_for(dtype, k: int, n: int, count: int):
    """``count`` distinct weights as the kernel takes them: bf16 [K, N], narrow [N, K] + scales [N], or
    int4 codes [G, N, g] + scales and offsets [G, N]."""
    out, g, dtype = [], group_size(dtype), weight_dtype(dtype)
    for i in range(count):
        if g:
            kc, ks = jax.random.split(jax.random.key(i))
            scales = jax.random.uniform(ks, (k // g, n), jnp.float32, 0.5, 1.5) * 0.003
            codes = jax.random.randint(kc, (k // g, n, g), -8, 8).astype(jnp.int4)
            out.append((codes, scales, scales * 0.5))
            continue
        w = jax.random.normal(jax.random.key(i), (n, k), jnp.float32) * 0.02
        if dtype == "bfloat16":
            out.append((w.T.astype(jnp.bfloat16),))
        else:
            scale = jnp.max(jnp.abs(w), axis=1) / (127 if dtype == "int8" else 448)
            out.append(((w / scale[:, None]).round().astype(dtype) if dtype == "int8"
                        else (w / scale[:, None]).astype(dtype), scale))
    return out


def heuristic_config(dtype: str, m: int, k: int, n: int) -> dict:
    g = group_size(dtype)
    if g:
        config = i4.default_config(m, k, n, g)
        return dict(tile_n=config.tile_n, tile_k=config.tile_k, num_stages=config.num_stages,
                    num_k_splits=config.num_k_splits)
    if w8a8_activations(dtype):
        return w8.heuristic_config(m, k, n)
    if m > mm.SMALL_M_MAX:
        return mm.large_m_heuristic(m, k, n)
    return mm.small_m_heuristic(m, k, n, itemsize(dtype))


def large_m_candidates(m: int, k: int, n: int, stages_list=LARGE_M_STAGES, splits_list=LARGE_M_SPLITS):
    """Every bf16 large-M (tile_m, tile_n, tile_k, stages, splits) that fits (M, K, N): 2*tile_n divides N,
    the split-K ranges and the SMEM budget (``mm.large_m_shape_error``)."""
    for tile_m, tile_n, tile_k, stages, splits in itertools.product((64, 128), (64, 128), (64, 128), stages_list,
                                                                    splits_list):
        fields = dict(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, num_stages=stages, num_k_splits=splits)
        if mm.large_m_shape_error(m, k, n, mm.MatmulConfig(**fields)) is None:
            yield fields


def candidates(dtype: str, m: int, k: int, n: int, sweep: bool, stages_list=(2, 3, 4), splits_list=(1, 2, 3, 4, 6, 8),
               large_m_stages=LARGE_M_STAGES, large_m_splits=LARGE_M_SPLITS, from_table: bool = False):
    """The heuristic's config; with ``from_table`` also this card's table entry, if any (re-times what the
    table holds, against XLA); with ``sweep`` every fitting (tile_n, tile_k, stages, splits) around it
    (large M: also tile_m, from ``large_m_stages`` / ``large_m_splits``)."""
    heuristic = heuristic_config(dtype, m, k, n)
    yield heuristic
    tabled = tuning.lookup(*table_slot(dtype, m, k, n)) if from_table else None
    if tabled is not None and tabled != heuristic:
        yield tabled
    if not sweep:
        return
    if m > mm.SMALL_M_MAX:
        yield from (fields for fields in large_m_candidates(m, k, n, large_m_stages, large_m_splits)
                    if fields not in (heuristic, tabled))
        return
    tile_ks = (128, 256, 512) if group_size(dtype) or itemsize(dtype) == 1 else (128, 256)  # 512: 8-bit rows of 512 B
    for tile_n, tile_k, stages, splits in itertools.product((128,), tile_ks, stages_list, splits_list):
        if k // tile_k < 2 * splits or tile_k % max(group_size(dtype), 1):  # >= 2 steps a split; whole groups
            continue
        fields = dict(tile_n=tile_n, tile_k=tile_k, num_stages=stages, num_k_splits=splits)
        error = mm.small_m_shape_error(m, k, n, mm.MatmulConfig(**fields), itemsize(dtype), activation_itemsize(dtype))
        if fields not in (heuristic, tabled) and error is None:
            yield fields


def tune_one(dtype: str, m: int, k: int, n: int, bandwidth_gbs: float | None, sweep: bool, **sweep_lists) -> dict:
    weight_bytes = k * n * itemsize(dtype)
    # distinct weights over twice L2, and >= CHAIN_BYTES of them: a short chain (6 calls of a 12 µs projection) is
    # timed as much by the host's dispatch and the clocks as by the kernel (H200, session 20: 2x run-to-run spread)
    count = max(2, int(-(-max(2 * L2_BYTES, CHAIN_BYTES) // weight_bytes)))
    ws = weights_for(dtype, k, n, count)
    a = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    if group_size(dtype):
        ours = lambda cfg: (lambda a, c, s, o: i4.int4_matmul(a, c, s, o, config=i4.Int4MatmulConfig(**cfg)))
        xla = lambda a, c, s, o: jnp.dot(a, i4.dequantize(c, s, o, jnp.bfloat16))
    elif w8a8_activations(dtype):  # the model's calls: quantize the tokens, then the kernel / XLA's rule on [N, K]
        act = w8a8_activations(dtype)

        def ours(cfg):
            def fn(a, w, s):
                a_q, a_scale = quantize_activations(a, act)
                return w8.w8a8_matmul(a_q, a_scale[:, 0], w, s, config=w8.W8A8MatmulConfig(**cfg))
            return fn
        xla = lambda a, w, s: w8a8_product(a, w, s, act, weights_nk=True).astype(jnp.bfloat16)
    elif dtype == "bfloat16":
        ours = lambda cfg: (lambda a, w: mm.matmul(a, w, config=mm.MatmulConfig(**cfg)))
        xla = lambda a, w: jnp.dot(a, w)
    else:
        ours = lambda cfg: (lambda a, w, s: qm.quantized_matmul(a, w, s, config=qm.QuantizedMatmulConfig(**cfg)))
        xla = lambda a, w, s: (jnp.dot(a, w.T.astype(jnp.bfloat16)) * s).astype(jnp.bfloat16)
    heuristic = heuristic_config(dtype, m, k, n)
    def compiled(fields):  # compiled in parallel threads: compilation dominates a sweep
        try:
            return chain(ours(fields)).lower(a, ws).compile()
        except Exception as e:  # a candidate that fails to compile is skipped, not fatal
            print(f"  {fields}: fails: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            return None

    configs = list(candidates(dtype, m, k, n, sweep, **sweep_lists))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        programs = list(pool.map(compiled, configs))
    results = [(time_ms(p, a, ws, iterations=10) / len(ws), f) for p, f in zip(programs, configs) if p is not None]
    best_ms, best = min(results, key=lambda r: r[0])
    heur_ms = next((t for t, f in results if f == heuristic), None)
    xla_ms = time_chained_ms(xla, a, ws)
    gbs = lambda t: weight_bytes / t / 1e6
    tflops = lambda t: f", {2 * m * k * n / t / 1e9:.0f} TFLOP/s" if m > mm.SMALL_M_MAX else ""  # large M: compute-bound
    heur = "failed" if heur_ms is None else f"{heur_ms * 1e3:.1f} us"
    print(f"{dtype} M={m} K={k} N={n}: best {best} {best_ms * 1e3:.1f} us ({gbs(best_ms):.0f} GB/s{tflops(best_ms)})"
          f" | heuristic {heur} | XLA {xla_ms * 1e3:.1f} us ({gbs(xla_ms):.0f} GB/s{tflops(xla_ms)})"
          f" | best {xla_ms / best_ms:.2f}x XLA"
          + (f" | of copy bw {gbs(best_ms) / bandwidth_gbs:.2f}" if bandwidth_gbs else ""), flush=True)
    return dict(best=best, best_ms=best_ms, heuristic_ms=heur_ms, xla_ms=xla_ms)


def table_slot(dtype: str, m: int, k: int, n: int) -> tuple[str, str, str]:
    """(kernel table, table dtype, shape key) where a result of ``dtype`` at (M, K, N) is stored."""
    if g := group_size(dtype):
        return "int4_matmul", "int4", i4.shape_key(m, k, n, g)
    kernel = "matmul" if dtype == "bfloat16" else "w8a8_matmul" if w8a8_activations(dtype) else "quantized_matmul"
    return kernel, weight_dtype(dtype), mm.shape_key(m, k, n)


def write_tables(kind: str, report: list[dict]) -> None:
    """Writes each result's winner (``report``: ``tune_one``'s results with their dtype, m, k, n) for card
    ``kind`` into its kernel's tuning table, with its time and XLA's (``tuning.beats_xla`` reads them)."""
    tables: dict[str, list[dict]] = {"matmul": [], "quantized_matmul": [], "int4_matmul": [], "w8a8_matmul": []}
    for r in report:
        kernel, dtype, shape = table_slot(r["dtype"], r["m"], r["k"], r["n"])
        tables[kernel].append(dict(device_kind=kind, dtype=dtype, shape=shape, config=r["best"],
                                   kernel_us=round(r["best_ms"] * 1e3, 2), xla_us=round(r["xla_ms"] * 1e3, 2)))
    for kernel, entries in tables.items():
        if entries:
            write_table(kernel, entries)


def write_table(kernel: str, new_entries: list[dict]):
    path = tuning.TUNING_DIR / f"{kernel}.json"
    entries = json.loads(path.read_text())["entries"] if path.exists() else []
    keys = {(e["device_kind"], e["dtype"], e["shape"]) for e in new_entries}
    entries = [e for e in entries if (e["device_kind"], e["dtype"], e["shape"]) not in keys] + new_entries
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"entries": sorted(entries, key=lambda e: (e["device_kind"], e["dtype"], e["shape"]))},
                               indent=1) + "\n")
    print(f"wrote {len(new_entries)} entries to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,16,64")
    parser.add_argument("--dtypes", default="bfloat16,int8,float8_e4m3fn")
    parser.add_argument("--shapes", default="qkv,o_proj,gate_up,down")
    parser.add_argument("--sweep", action="store_true", help="time every candidate config, not only the heuristic's")
    parser.add_argument("--from_table", action="store_true",
                        help="also time this card's tuning-table config (no sweep needed to re-measure it vs XLA)")
    parser.add_argument("--stages", default="2,3,4", help="pipeline depths of the small-M sweep")
    parser.add_argument("--splits", default="1,2,3,4,6,8", help="split-K factors of the small-M sweep")
    parser.add_argument("--large-m-stages", default=",".join(map(str, LARGE_M_STAGES)),
                        help="pipeline depths of the large-M sweep (M > 128, bfloat16)")
    parser.add_argument("--large-m-splits", default=",".join(map(str, LARGE_M_SPLITS)),
                        help="split-K factors of the large-M sweep")
    parser.add_argument("--write", action="store_true", help="write the winners to the tuning tables")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--write_from", help="write the tuning tables from --out files of earlier runs "
                        "(comma-separated; e.g. fetched from a GPU machine whose working tree does not come back), "
                        "time nothing (runs on CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each shape's heuristic config and candidate count, time nothing (runs on CPU)")
    args = parser.parse_args(argv)
    ints = lambda text: tuple(map(int, text.split(",")))
    large = [m for m in ints(args.ms) if m > mm.SMALL_M_MAX]
    narrow = [d for d in args.dtypes.split(",") if d != "bfloat16"]
    if large and narrow:
        parser.error(f"M={large} > {mm.SMALL_M_MAX} (the large-M kernel) is bfloat16 only, not {narrow}")
    sweep_lists = dict(stages_list=ints(args.stages), splits_list=ints(args.splits),
                       large_m_stages=ints(args.large_m_stages), large_m_splits=ints(args.large_m_splits),
                       from_table=args.from_table)
    if args.write_from:
        for path in args.write_from.split(","):
            run = json.loads(pathlib.Path(path).read_text())
            write_tables(run["device_kind"], run["results"])
        return
    if args.dry_run:
        for dtype, name, m in itertools.product(args.dtypes.split(","), args.shapes.split(","), ints(args.ms)):
            configs = list(candidates(dtype, m, *SHAPES[name], args.sweep, **sweep_lists))
            print(f"{dtype} {name} M={m}: heuristic {configs[0]}, {len(configs)} candidates")
        return
    kind = jax.devices()[0].device_kind
    bandwidth_gbs = copy_bandwidth() / 1e9
    print(f"{kind}, jax {jax.__version__}: copy bandwidth {bandwidth_gbs:,.0f} GB/s (read + write)", flush=True)
    report = []
    for dtype, name, m in itertools.product(args.dtypes.split(","), args.shapes.split(","), ints(args.ms)):
        k, n = SHAPES[name]
        r = tune_one(dtype, m, k, n, bandwidth_gbs, args.sweep, **sweep_lists)
        report.append(dict(dtype=dtype, shape=name, m=m, k=k, n=n, **r))
    if args.write:
        write_tables(kind, report)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(device_kind=kind, jax=jax.__version__, copy_gbs=bandwidth_gbs, results=report), indent=1))


if __name__ == "__main__":
    main()
