"""``autoglm analyze``: per serving step, what XLA compiled and what it should cost on this device.

Owns: assembling one report (a JSON-ready dict) for a model and engine settings from the compiled
steps (``tools.step_programs``): HLO op/fusion/kernel counts, custom calls by library (Pallas,
cuDNN, cuBLAS), XLA's cost analysis, trip-count-aware matmul FLOPs next to the hand count, the
minimum memory traffic, the roofline time and bound on the device, and the fusion before/after
table (``tools.fusion_report``); and rendering it as text tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.tools import flop_count
from autoglm_jax.tools.cost import xla_cost
from autoglm_jax.tools.fusion_report import fusion_counts
from autoglm_jax.tools.hlo_flops import hlo_matmul_flops
from autoglm_jax.tools.hlo_stats import hlo_stats
from autoglm_jax.tools.roofline import DeviceSpec, device_spec, roofline
from autoglm_jax.tools.step_programs import StepProgram, StepPrograms


def hand_flops(config: ModelConfig, program: StepProgram) -> int:
    """The hand count for a step: prefill sends B sampled rows plus (worst case, the prompt-logprobs
    branch) all T tokens through the LM head; a decode figure is one loop iteration of B rows."""
    rows = program.num_rows + (program.num_tokens if program.name == "prefill" else 0)
    return flop_count.step_flops(config, program.num_tokens, rows, program.context)


def step_report(programs: StepPrograms, program: StepProgram, spec: DeviceSpec | None) -> dict:
    text = program.compiled.as_text()
    stats = hlo_stats(text)
    matmul = hlo_matmul_flops(text)
    min_bytes = flop_count.step_min_bytes(programs.model_config, programs.dtype, program.num_tokens,
                                          program.num_rows, program.context, programs.kv_cache_dtype)
    report = {
        "step": program.name, "num_tokens": program.num_tokens, "num_rows": program.num_rows,
        "context": program.context, "hlo": stats.to_dict(), "xla_cost": xla_cost(program.compiled),
        "matmul_flops": matmul, "hand_flops": hand_flops(programs.model_config, program),
        "min_bytes": min_bytes, "roofline": None,
    }
    if spec is not None:
        report["roofline"] = roofline(matmul, min_bytes, spec, programs.dtype).to_dict()
    return report


def analyze(model_config: ModelConfig, engine_config: EngineConfig, *, prefill_tokens: int | None = None,
            decode_batch: int | None = None, spec: DeviceSpec | None = None, fusions: bool = True) -> dict:
    """The full report (see the module docstring). Defaults: the ladder's largest buckets and the
    device table's entry for the default device (no roofline when the device is not in it)."""
    programs = StepPrograms(model_config, engine_config)
    device = jax.devices()[0]
    spec = spec or device_spec(device.device_kind)
    prefill = programs.prefill(prefill_tokens)
    decode = programs.decode(decode_batch)
    report = {
        "model": model_config.architecture, "num_parameters": model_config.num_parameters(),
        "device": device.device_kind, "device_spec": spec.name if spec else None,
        "dtype": jnp.dtype(programs.dtype).name, "kv_cache_dtype": jnp.dtype(programs.kv_cache_dtype).name,
        "attention_backend": programs.attention_backend, "num_pages": programs.num_pages,
        "steps": [step_report(programs, p, spec) for p in (prefill, decode)],
        "fusions": [],
    }
    if fusions:
        report["fusions"] = [c.to_dict() for c in fusion_counts(programs, prefill.num_tokens, decode.num_rows)]
    return report


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def format_report(report: dict) -> str:
    """The report as text tables: steps, custom calls, roofline, fusion before/after."""
    out = [f"model {report['model']} ({_si(report['num_parameters'])} params), dtype {report['dtype']}, "
           f"KV cache {report['kv_cache_dtype']}, attention {report['attention_backend']}, device {report['device']}"]
    rows = []
    for s in report["steps"]:
        h, c = s["hlo"], s["xla_cost"]
        libs = ", ".join(f"{k}={v}" for k, v in sorted(h["custom_call_libraries"].items())) or "-"
        rows.append([f"{s['step']} T={s['num_tokens']} B={s['num_rows']}", h["num_ops"], h["num_fusions"],
                     h["num_kernels"], h["op_counts"].get("dot", 0), libs, _si(s["matmul_flops"], "FLOP"),
                     _si(s["hand_flops"], "FLOP"), _si(c["flops"], "FLOP"), _si(c["bytes_accessed"], "B"),
                     _si(s["min_bytes"], "B")])
    out += ["", _table(["step", "ops", "fusions", "kernels", "dots", "custom calls", "matmul FLOPs", "hand FLOPs",
                        "XLA FLOPs*", "XLA bytes*", "min bytes"], rows),
            "* XLA's cost analysis counts a while body (the layer scan) once."]
    roof = [[s["step"], f"{s['roofline']['time_s'] * 1e3:.4f}", f"{s['roofline']['compute_s'] * 1e3:.4f}",
             f"{s['roofline']['memory_s'] * 1e3:.4f}", f"{s['roofline']['arithmetic_intensity']:.1f}",
             s["roofline"]["bound"]] for s in report["steps"] if s["roofline"]]
    if roof:
        out += ["", f"roofline on {report['device_spec']}:",
                _table(["step", "time ms", "compute ms", "memory ms", "FLOP/byte", "bound"], roof)]
    else:
        out += ["", f"roofline: no peak figures for device {report['device']!r} (pass --peak_tflops and "
                    "--memory_bandwidth_gbs)"]
    if report["fusions"]:
        fusion_rows = [[f["shape"], f["label"], f["hlo_ops"], f["hlo_dots"], f["compiled_ops"], f["compiled_dots"],
                        f["compiled_fusions"], f["compiled_kernels"], _si(f["matmul_flops"], "FLOP")]
                       for f in report["fusions"]]
        out += ["", "model-level fusions (forward only; 'hlo' = before XLA optimisation, per layer-scan body):",
                _table(["shape", "variant", "hlo ops", "hlo dots", "ops", "dots", "fusions", "kernels", "matmul FLOPs"],
                       fusion_rows)]
    return "\n".join(out)
