"""Matmul FLOPs of a compiled HLO module, counted from its text with loop trip counts applied.

Owns: one number XLA's own cost analysis gets wrong for our steps — it counts a ``while`` body once
(the layers run under ``lax.scan``) and mixes conditional branches. Here a computation's FLOPs are
the sum over its instructions of:
  - ``dot``: 2 x prod(result dims) x prod(lhs contracting dims);
  - cuBLAS GEMM custom calls (``__cublas$gemm``, ``__cublas$lt$matmul``): the same, contracting
    dims read from their ``gemm_backend_config``;
  - ``fusion`` / ``call``: the called computation's FLOPs;
  - ``while``: body FLOPs x ``known_trip_count`` (x 1 when the trip count is dynamic, e.g. the decode
    loop, whose figure is then per iteration);
  - ``conditional``: the largest branch (an upper bound).
Pallas / cuDNN custom calls are opaque and contribute 0 (the report lists them separately).
"""

from __future__ import annotations

import functools
import json
import math
import re

from autoglm_jax.tools.hlo_stats import instruction_opcode, split_computations

_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_CALLS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+))")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GEMM_CONFIG = re.compile(r'backend_config=(\{.*\})')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)")
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _shape_table(lines: list[str]) -> dict[str, list[int]]:
    """Instruction name -> result dims (array results only) within one computation."""
    table = {}
    for line in lines:
        match = _DEFINITION.match(line)
        if match:
            shape = _SHAPE.match(match.group(2))
            if shape:
                table[match.group(1)] = _dims(shape.group(1))
    return table


def _result_and_operand_shapes(line: str, shapes: dict[str, list[int]]) -> tuple[list[int], list[list[int]]]:
    """Result dims and operand dims of ``%x = f32[a,b]{..} op(%p, %q), ...`` (operands looked up)."""
    rhs = line.split("= ", 1)[1]
    result = _SHAPE.search(rhs)
    opcode = instruction_opcode(line) or ""
    args = rhs.split(opcode + "(", 1)[1].split(")", 1)[0] if opcode + "(" in rhs else ""
    operands = [shapes[name] for name in _OPERANDS.findall(args) if name in shapes]
    return (_dims(result.group(1)) if result else []), operands


def _dot_flops(line: str, shapes) -> int:
    result, operands = _result_and_operand_shapes(line, shapes)
    contracting = _LHS_CONTRACTING.search(line)
    if not operands or contracting is None:
        return 0
    lhs = operands[0]
    k = math.prod(lhs[d] for d in _dims(contracting.group(1)))
    return 2 * math.prod(result) * k


def _gemm_flops(line: str, shapes) -> int:
    config = _GEMM_CONFIG.search(line)
    if config is None:
        return 0
    try:
        dims = json.loads(config.group(1))["gemm_backend_config"]["dot_dimension_numbers"]
    except (ValueError, KeyError):
        return 0
    result, operands = _result_and_operand_shapes(line, shapes)
    if not operands:
        return 0
    k = math.prod(operands[0][int(d)] for d in dims.get("lhs_contracting_dimensions", []))
    # cuBLAS results may be tuples (output, workspace): the first shape is the product.
    return 2 * math.prod(result) * k


def hlo_matmul_flops(hlo_text: str) -> int:
    """Matmul FLOPs of the module's entry computation (see the module docstring for the rules)."""
    computations = split_computations(hlo_text)
    entry = next((name for name, _ in _entries(hlo_text)), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    @functools.cache
    def flops(name: str) -> int:
        total = 0
        lines = computations.get(name, ())
        shapes = _shape_table(lines)
        for line in lines:
            opcode = instruction_opcode(line)
            if opcode == "dot":
                total += _dot_flops(line, shapes)
            elif opcode == "custom-call" and "__cublas" in line:
                total += _gemm_flops(line, shapes)
            elif opcode in ("fusion", "call"):
                total += sum(flops(c) for c in _CALLS.findall(line))
            elif opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = _TRIP_COUNT.search(line)
                total += flops(body) * (int(trips.group(1)) if trips else 1)
            elif opcode == "conditional":
                total += max((flops(b) for b in _branch_names(line)), default=0)
        return total

    return flops(entry)


def _branch_names(line: str) -> list[str]:
    match = _BRANCHES.search(line)
    if match is None:
        return []
    if match.group(1) is not None:
        return [b.strip().lstrip("%") for b in match.group(1).split(",") if b.strip()]
    return [match.group(2), match.group(3)]


def _entries(hlo_text: str):
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            name = line.split()[1].lstrip("%")
            yield name, line
