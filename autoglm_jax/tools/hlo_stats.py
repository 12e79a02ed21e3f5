"""Counts over an XLA HLO module's text: instructions by opcode, fusions, kernels and custom calls.

Owns: parsing ``compiled.as_text()`` / ``lowered.as_text(dialect="hlo")`` into plain counts and
classifying custom calls by the library that runs them (Pallas / Triton kernels, cuDNN, cuBLAS).
It does not own compiling (``tools.step_programs``) or costs (``tools.cost``).

Counting rules:
  - ``op_counts``: every instruction of every computation, fused computations included, by opcode;
  - ``num_ops``: the same, minus bookkeeping opcodes (parameter, constant, tuple, get-tuple-element,
    bitcast) that never compute anything;
  - ``num_fusions``: ``fusion`` instructions (one generated kernel each on GPU);
  - ``num_kernels``: instructions outside fused computations that launch device work (fusions,
    custom calls and unfused compute ops; control flow and bookkeeping excluded). A while-loop
    body counts once, as it appears in the program.
"""

from __future__ import annotations

import collections
import dataclasses
import re

BOOKKEEPING = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
                         "opt-barrier", "partition-id", "replica-id"})
CONTROL_FLOW = frozenset({"while", "conditional", "call"})
# custom_call_target -> library; the first matching rule wins (substring, case-insensitive).
CUSTOM_CALL_LIBRARIES = (
    ("mosaic", "pallas"),              # Pallas Mosaic GPU / TPU kernels
    ("triton", "pallas"),              # Pallas Triton kernels (__gpu$xla.gpu.triton)
    ("tpu_custom_call", "pallas"),
    ("__cudnn", "cudnn"),
    ("__cublas", "cublas"),
)

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FUSION_KIND = re.compile(r"kind=(k\w+)")
_TRITON_GEMM = re.compile(r'"kind":"(__triton[\w]*)"')


@dataclasses.dataclass(frozen=True)
class HloStats:
    num_ops: int
    num_fusions: int
    num_kernels: int
    op_counts: dict[str, int]             # opcode -> instructions, fused computations included
    fusion_kinds: dict[str, int]          # kLoop / kInput / kOutput / kCustom (+ __triton_gemm) -> count
    custom_calls: dict[str, int]          # custom_call_target -> count
    custom_call_libraries: dict[str, int]  # pallas / cudnn / cublas / other -> count

    def count(self, opcode: str) -> int:
        return self.op_counts.get(opcode, 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def classify_custom_call(target: str) -> str:
    """``"pallas"``, ``"cudnn"``, ``"cublas"`` or ``"other"`` for a custom_call_target."""
    lowered = target.lower()
    for needle, library in CUSTOM_CALL_LIBRARIES:
        if needle in lowered:
            return library
    return "other"


def instruction_opcode(line: str) -> str | None:
    """The opcode of one instruction line ``%name = <type> opcode(...)``, or None if not an instruction."""
    match = _NAME.match(line)
    if match is None:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # tuple type: skip the balanced parentheses
        depth = 0
        for i, char in enumerate(rest):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    opcode = rest.strip().split("(", 1)[0]
    return opcode or None


def split_computations(hlo_text: str) -> dict[str, list[str]]:
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if current is None:
            match = _COMPUTATION.match(stripped)
            if match and not stripped.startswith("HloModule"):
                current = match.group(1)
                computations[current] = []
            continue
        if stripped == "}":
            current = None
            continue
        computations[current].append(stripped)
    return computations


def hlo_stats(hlo_text: str) -> HloStats:
    """Counts over an HLO module in text form (see the module docstring for the rules)."""
    computations = split_computations(hlo_text)
    if not computations:
        raise ValueError("no HLO computations found in the text (expected the output of as_text())")
    fused: set[str] = set()
    for lines in computations.values():
        for line in lines:
            if instruction_opcode(line) == "fusion":
                fused.update(_CALLS.findall(line))
    ops: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    targets: collections.Counter = collections.Counter()
    libraries: collections.Counter = collections.Counter()
    num_kernels = 0
    for name, lines in computations.items():
        for line in lines:
            opcode = instruction_opcode(line)
            if opcode is None:
                continue
            ops[opcode] += 1
            if opcode == "custom-call":
                target = _TARGET.search(line)
                target = target.group(1) if target else "?"
                targets[target] += 1
                libraries[classify_custom_call(target)] += 1
            if name in fused:
                continue
            if opcode == "fusion":
                kind = _FUSION_KIND.search(line)
                triton = _TRITON_GEMM.search(line)
                kinds[triton.group(1) if triton else (kind.group(1) if kind else "?")] += 1
            if opcode not in BOOKKEEPING and opcode not in CONTROL_FLOW:
                num_kernels += 1
    num_ops = sum(n for op, n in ops.items() if op not in BOOKKEEPING)
    return HloStats(num_ops=num_ops, num_fusions=ops["fusion"], num_kernels=num_kernels, op_counts=dict(ops),
                    fusion_kinds=dict(kinds), custom_calls=dict(targets), custom_call_libraries=dict(libraries))
