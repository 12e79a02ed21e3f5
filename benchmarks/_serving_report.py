"""The serving benchmarks' results: rows, the markdown table, the speed-up line, the plot, the JSON file.

Owns: presentation only. A row is one (engine, mode, workload, request rate) run: ``summarize``'s
metrics plus ``engine`` ("autoglm-jax" / "transformers"), ``mode`` (e.g. "dynamic batching"),
``workload`` (``ServingWorkload.label``) and ``request_rate`` (req/s; None = offline). A results file
is ``{"runs": [{"meta": {...}, "rows": [...]}, ...]}`` so ``serving.py --merge`` can put the JSON of
``serving.py`` and ``hf_serving.py`` (separate processes: JAX holds the GPU's memory) in one table and plot.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

COLUMNS = (  # (header, row key, format)
    ("output tok/s", "output_tokens_per_s", "{:,.0f}"), ("req/s", "requests_per_s", "{:.2f}"),
    ("mean latency (ms)", "e2e_mean_ms", "{:,.0f}"),
    ("TTFT p50 / p90 / p99 (ms)", "ttft", "pct0"), ("TPOT p50 / p90 / p99 (ms)", "tpot", "pct1"),
    ("ITL p50 / p90 / p99 (ms)", "itl", "pct1"), ("GPU util mean (%)", "gpu_util_mean_pct", "{:.0f}"),
)


def rate_label(rate: float | None) -> str:
    return "offline" if rate is None else f"{rate:g}/s"


def parse_rates(values: Iterable[str]) -> list[float | None]:
    """['inf', '4', '16'] -> [None, 4.0, 16.0] (inf = offline: every request at t=0)."""
    rates = []
    for value in values:
        rate = float(value)
        if math.isnan(rate) or rate <= 0:
            raise ValueError(f"request rate {value!r} must be > 0 req/s or 'inf' (offline)")
        rates.append(None if math.isinf(rate) else rate)
    if not rates:
        raise ValueError("give at least one request rate ('inf' = offline)")
    return rates


def _cell(row: dict, key: str, fmt: str) -> str:
    if fmt.startswith("pct"):
        digits = int(fmt[3:])
        return " / ".join(f"{row[f'{key}_{q}_ms']:,.{digits}f}" for q in ("p50", "p90", "p99"))
    value = row.get(key)
    return "n/a" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    header = ["engine", "mode", "workload", "rate", "requests"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["engine"], row["mode"], row["workload"], rate_label(row["request_rate"]), str(row["num_requests"])]
        lines.append("| " + " | ".join(cells + [_cell(row, key, fmt) for _, key, fmt in COLUMNS]) + " |")
    return "\n".join(lines)


def speedups(rows: list[dict], baseline_engine: str = "transformers") -> list[str]:
    """One line per offline autoglm-jax row with an offline baseline row of the same workload label."""
    baselines = {r["workload"]: r for r in rows if r["engine"] == baseline_engine and r["request_rate"] is None}
    lines = []
    for row in rows:
        base = baselines.get(row["workload"])
        if row["engine"] == baseline_engine or row["request_rate"] is not None or base is None:
            continue
        ratio = row["output_tokens_per_s"] / base["output_tokens_per_s"]
        lines.append(f"{row['engine']} {row['mode']}, {row['workload']} offline: {row['output_tokens_per_s']:,.0f} "
                     f"output tok/s ({row['num_requests']} requests) = {ratio:.2f}x {baseline_engine} "
                     f"{base['mode']} ({base['output_tokens_per_s']:,.0f} tok/s, {base['num_requests']} requests)")
    return lines


def plot(rows: list[dict], path: str) -> None:
    """Output tok/s against mean latency, one line per (engine, mode, workload), one point per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    for row in rows:
        lines.setdefault(f"{row['engine']} · {row['mode']} · {row['workload']}", []).append(row)
    figure, axes = plt.subplots(figsize=(9, 6))
    for name, points in lines.items():
        points = sorted(points, key=lambda r: math.inf if r["request_rate"] is None else r["request_rate"])
        x = [p["e2e_mean_ms"] / 1e3 for p in points]
        y = [p["output_tokens_per_s"] for p in points]
        axes.plot(x, y, marker="o", label=name)
        for p, xi, yi in zip(points, x, y):
            axes.annotate(rate_label(p["request_rate"]), (xi, yi), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    axes.set_xscale("log")  # offline (every request queued at once) and light load differ by orders of magnitude
    axes.set_xlabel("mean latency (s, end to end; log scale)")
    axes.set_ylabel("output tokens/s")
    axes.set_title("Serving throughput vs latency (point labels: request rate)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"runs": [{"meta": meta, "rows": rows}]}, f, indent=1)


def read_results(paths: Iterable[str]) -> tuple[list[dict], list[dict]]:
    """(metas, rows) of every run in the given results files."""
    metas, rows = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if "runs" not in data:
            raise ValueError(f"{path} is not a serving results file (no 'runs' key)")
        for run in data["runs"]:
            metas.append(run["meta"])
            rows += run["rows"]
    return metas, rows
