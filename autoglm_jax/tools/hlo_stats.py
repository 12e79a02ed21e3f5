"""Counts over an XLA HLO module's text: instructions by opcode, fusions, kernels and custom calls.

Owns: parsing ``compiled.as_text()`` / ``lowered.as_text(dialect="hlo")`` into plain counts,
classifying custom calls by the library that runs them (Pallas / Triton kernels, cuDNN, cuBLAS), and the
ordered kernel launches of one computation (``kernel_sequence``: what one decoder layer of a decode step
is made of, from an ``--xla_dump_to`` file; ``python -m autoglm_jax.tools.hlo_stats <dump.txt>``).
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
    _, rest = _split_result_type(line[match.end():])
    opcode = rest.strip().split("(", 1)[0]
    return opcode or None


def _split_result_type(text: str) -> tuple[str, str]:
    """``<type> opcode(...)...`` -> (type, the rest); a tuple type up to its balanced parenthesis."""
    if text.startswith("("):
        depth = 0
        for i, char in enumerate(text):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                return text[: i + 1], text[i + 1:]
    return (text.split(" ", 1) + [""])[:2] if " " in text else (text, "")


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


def _computations(hlo_text: str) -> dict[str, list[str]]:
    computations = split_computations(hlo_text)
    if not computations:
        raise ValueError("no HLO computations found in the text (expected the output of as_text())")
    return computations


def _fused_computations(computations: dict[str, list[str]]) -> set[str]:
    """Names of the computations that fusion instructions call (their bodies launch nothing themselves)."""
    return {callee for lines in computations.values() for line in lines
            if instruction_opcode(line) == "fusion" for callee in _CALLS.findall(line)}


def _launches_kernel(opcode: str | None) -> bool:
    """An instruction outside fused computations that launches device work (see ``num_kernels``)."""
    return opcode is not None and opcode not in BOOKKEEPING and opcode not in CONTROL_FLOW


def _fusion_kind(line: str) -> str:
    """A fusion's kind: XLA's Triton GEMM kind when it is one, else kLoop / kInput / kOutput / kCustom."""
    triton, kind = _TRITON_GEMM.search(line), _FUSION_KIND.search(line)
    return triton.group(1) if triton else (kind.group(1) if kind else "?")


def hlo_stats(hlo_text: str) -> HloStats:
    """Counts over an HLO module in text form (see the module docstring for the rules)."""
    computations = _computations(hlo_text)
    fused = _fused_computations(computations)
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
                kinds[_fusion_kind(line)] += 1
            if _launches_kernel(opcode):
                num_kernels += 1
    num_ops = sum(n for op, n in ops.items() if op not in BOOKKEEPING)
    return HloStats(num_ops=num_ops, num_fusions=ops["fusion"], num_kernels=num_kernels, op_counts=dict(ops),
                    fusion_kinds=dict(kinds), custom_calls=dict(targets), custom_call_libraries=dict(libraries))


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    name: str     # the instruction, e.g. "loop_multiply_fusion.79"
    opcode: str   # fusion / custom-call / dot / ...
    kind: str     # fusion kind (kLoop, kInput, kCustom, __triton_gemm, ...), custom_call_target, or the opcode
    callee: str   # the fused computation ("" for unfused ops and custom calls)
    shape: str    # the result type, e.g. "bf16[1,4096]{1,0}"


def kernel_sequence(hlo_text: str, computation: str | None = None) -> tuple[str, list[KernelLaunch]]:
    """(computation, its kernel launches in program order): instructions that launch device work, as
    ``hlo_stats`` counts them (fusions, custom calls, unfused compute ops). ``computation``: by name; None =
    the non-fused computation with the most launches (in a decode step program: the decode loop's body)."""
    computations = _computations(hlo_text)
    fused = _fused_computations(computations)
    launches = {name: [launch for line in lines if (launch := _launch(line)) is not None]
                for name, lines in computations.items() if name not in fused}
    if computation is None:
        computation = max(launches, key=lambda name: len(launches[name]))
    elif computation not in launches:
        raise ValueError(f"no unfused computation {computation!r} (have {sorted(launches)[:8]}...)")
    return computation, launches[computation]


def _launch(line: str) -> KernelLaunch | None:
    opcode = instruction_opcode(line)
    if not _launches_kernel(opcode):
        return None
    match = _NAME.match(line)
    name = match.group(0).split("=")[0].replace("ROOT", "").strip().lstrip("%")
    shape, _ = _split_result_type(line[match.end():])
    called = _CALLS.search(line) if opcode == "fusion" else None
    callee = called.group(1) if called else ""
    if opcode == "custom-call":
        target = _TARGET.search(line)
        kind = target.group(1) if target else "?"
    elif opcode == "fusion":
        kind = _fusion_kind(line)
    else:
        kind = opcode
    return KernelLaunch(name=name, opcode=opcode, kind=kind, callee=callee, shape=shape)


def main(argv: list[str] | None = None) -> None:
    """Prints a dump file's kernel sequence: ``<hlo.txt> [computation] [--first N]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Kernel launches of one HLO computation, in order.")
    parser.add_argument("path", help="an HLO text file, e.g. *after_optimizations.txt from --xla_dump_to")
    parser.add_argument("computation", nargs="?", default=None, help="default: the one with the most launches")
    parser.add_argument("--first", type=int, default=None, help="print only the first N launches")
    args = parser.parse_args(argv)
    with open(args.path) as f:
        name, launches = kernel_sequence(f.read(), args.computation)
    print(f"{name}: {len(launches)} kernel launches")
    for i, k in enumerate(launches[: args.first]):
        print(f"{i:5d}  {k.kind:24s} {k.name:40s} {k.shape}")


if __name__ == "__main__":
    main()
