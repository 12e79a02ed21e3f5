"""HLO text parsing: opcode counts, custom-call classification, trip-count-aware matmul FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.tools.hlo_flops import hlo_matmul_flops
from autoglm_jax.tools.hlo_stats import classify_custom_call, hlo_stats, kernel_sequence

SYNTHETIC = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %w = f32[16,16]{1,0} constant({...})
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  %z = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%z, %a)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %h = f32[8,16]{1,0} get-tuple-element(%loop), index=1
  %k = f32[8,16]{1,0} custom-call(%h), custom_call_target="__gpu$xla.gpu.triton"
  %g = (f32[8,32]{1,0}, s8[64]{0}) custom-call(%k, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %r = f32[8,32]{1,0} get-tuple-element(%g), index=0
}
"""


def test_counts_and_custom_calls_on_synthetic_module():
    stats = hlo_stats(SYNTHETIC)
    assert stats.count("dot") == 1 and stats.count("while") == 1 and stats.count("custom-call") == 2
    assert stats.custom_call_libraries == {"pallas": 1, "cublas": 1}
    # kernels: dot (in the body), two custom calls; bookkeeping and control flow excluded
    assert stats.num_kernels == 3
    assert stats.num_ops == 4  # dot, while, 2 custom calls (parameters, constants, tuples don't count)


def test_matmul_flops_apply_trip_count_and_gemm_config():
    loop = 5 * 2 * 8 * 16 * 16
    gemm = 2 * 8 * 32 * 16
    assert hlo_matmul_flops(SYNTHETIC) == loop + gemm


@pytest.mark.parametrize("target, library", [
    ("__gpu$xla.gpu.triton", "pallas"), ("mosaic_gpu_v2", "pallas"), ("__cudnn$fmhaSoftmax", "cudnn"),
    ("__cublas$lt$matmul", "cublas"), ("TopK", "other")])
def test_classify_custom_call(target, library):
    assert classify_custom_call(target) == library


def test_scan_flops_match_compiled_program():
    """A real compiled lax.scan of matmuls: the trip count multiplies the body's FLOPs."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((7, 32, 32)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)

    def f(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    text = jax.jit(f).lower(x, w).compile().as_text()
    assert hlo_matmul_flops(text) == 7 * 2 * 4 * 32 * 32


def test_rejects_text_without_computations():
    with pytest.raises(ValueError, match="no HLO computations"):
        hlo_stats("not hlo at all")


def test_kernel_sequence_lists_the_busiest_computation_in_order():
    name, launches = kernel_sequence(SYNTHETIC)
    assert name == "main"  # 2 launches against the body's 1 (the while itself is control flow)
    assert [(k.name, k.opcode, k.kind, k.shape) for k in launches] == [
        ("k", "custom-call", "__gpu$xla.gpu.triton", "f32[8,16]{1,0}"),
        ("g", "custom-call", "__cublas$gemm", "(f32[8,32]{1,0}, s8[64]{0})")]
    assert [k.kind for k in kernel_sequence(SYNTHETIC, "body")[1]] == ["dot"]
    with pytest.raises(ValueError, match="no unfused computation"):
        kernel_sequence(SYNTHETIC, "nope")


def test_kernel_sequence_of_a_compiled_loop_names_its_fusions():
    """A compiled lax.fori_loop body: one launch per fusion / dot, in order, with the fused callee."""
    def f(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w) * 2.0 + 1.0, x)

    x, w = jnp.ones((4, 32), jnp.float32), jnp.ones((32, 32), jnp.float32)
    text = jax.jit(f).lower(x, w).compile().as_text()
    _, launches = kernel_sequence(text)
    assert launches and all(k.callee for k in launches if k.opcode == "fusion")
    assert sum(k.opcode in ("fusion", "dot", "custom-call") for k in launches) == len(launches)
