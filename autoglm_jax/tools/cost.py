"""XLA's own cost analysis of a compiled program, normalised to one dict of floats.

Owns: reading ``Compiled.cost_analysis()`` (a dict, or a list of one dict on older jax) into
``{"flops", "bytes_accessed", "transcendentals"}``. XLA counts a ``while`` body once and takes
branch maxima, so these figures are per loop iteration; ``tools.hlo_flops`` applies trip counts.
"""

from __future__ import annotations

import jax


def xla_cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "transcendentals": float(analysis.get("transcendentals", 0.0))}
