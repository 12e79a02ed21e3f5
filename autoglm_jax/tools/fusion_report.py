"""Before/after counts of the model-level fusions (fused QKV, fused gate-up, folded norm scales).

Owns: lowering ``tools.fusion_variants.variant_forward`` for each fusion setting at a prefill shape
(T tokens) and a decode shape (B tokens, one per row) and counting, before XLA's optimisation
(the program as we write it) and after (what runs): ops, dots, fusions, kernels, matmul FLOPs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.tools.fusion_variants import ALL_FUSIONS, PRODUCTION, UNFUSED, Fusions, variant_forward, variant_params
from autoglm_jax.tools.hlo_flops import hlo_matmul_flops
from autoglm_jax.tools.hlo_stats import hlo_stats
from autoglm_jax.tools.step_programs import StepPrograms

VARIANTS = (UNFUSED, Fusions(fused_qkv=True, fused_gate_up=False), Fusions(fused_qkv=False, fused_gate_up=True),
            PRODUCTION, ALL_FUSIONS)


@dataclasses.dataclass(frozen=True)
class VariantCounts:
    label: str
    shape: str             # "prefill T=.." or "decode B=.."
    hlo_ops: int           # before optimisation
    hlo_dots: int
    compiled_ops: int      # after optimisation
    compiled_dots: int
    compiled_fusions: int
    compiled_kernels: int
    matmul_flops: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _counts(label: str, shape: str, lowered: jax.stages.Lowered) -> VariantCounts:
    before = hlo_stats(lowered.as_text(dialect="hlo"))
    compiled_text = lowered.compile().as_text()
    after = hlo_stats(compiled_text)
    return VariantCounts(label, shape, before.num_ops, before.count("dot"), after.num_ops, after.count("dot"),
                         after.num_fusions, after.num_kernels, hlo_matmul_flops(compiled_text))


def _decode_metadata(programs: StepPrograms, rows: int) -> AttentionMetadata:
    table = np.zeros((rows, programs.runner.max_pages_per_sequence), np.int32)
    return AttentionMetadata.build(np.zeros(rows, np.int32), np.ones(rows, np.int32), table,
                                   programs.runner.page_size, rows)


def fusion_counts(programs: StepPrograms, prefill_tokens: int, decode_rows: int,
                  variants: tuple[Fusions, ...] = VARIANTS) -> list[VariantCounts]:
    """Counts of every variant at the prefill shape, then at the decode shape."""
    runner, config = programs.runner, programs.model_config
    model_params = nnx.to_pure_dict(runner.params)
    step = runner._empty_step_input(prefill_tokens)
    shapes = [(f"prefill T={prefill_tokens}", step.md, prefill_tokens, step.logits_indices),
              (f"decode B={decode_rows}", _decode_metadata(programs, decode_rows), decode_rows,
               jnp.arange(decode_rows, dtype=jnp.int32))]
    forward = jax.jit(functools.partial(variant_forward, config, programs.attention_backend))
    results = []
    for shape, md, tokens, logits_indices in shapes:
        token_ids = jax.ShapeDtypeStruct((tokens,), jnp.int32)
        for fusions in variants:
            params = variant_params(config, model_params, fusions)
            lowered = forward.lower(params, token_ids, runner.state.kv, md, logits_indices)
            results.append(_counts(fusions.label, shape, lowered))
    return results
