"""The CPU interpreter NaN-fills kernel outputs, which the kernel tests rely on to catch unwritten elements."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._interpret import gpu_interpret
from tests.kernels.conftest import ON_GPU


@pytest.mark.skipif(ON_GPU, reason="checks the CPU interpreter")
def test_unwritten_output_is_nan():
    def writes_first_rows_only(x_ref, out_ref, smem, barrier):  # x_ref, out_ref [16, 128] f32
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 8)], smem, barrier)
        plgpu.barrier_wait(barrier)
        plgpu.copy_smem_to_gmem(smem, out_ref.at[pl.ds(0, 8)])
        plgpu.wait_smem_to_gmem(0)

    x = jax.random.normal(jax.random.key(0), (16, 128), jnp.float32)
    with gpu_interpret():
        out = plgpu.kernel(
            writes_first_rows_only, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
            scratch_types=(plgpu.SMEM((8, 128), jnp.float32), plgpu.Barrier(num_barriers=1)),
            grid=(1,), grid_names=("g",),
        )(x)
    np.testing.assert_array_equal(np.asarray(out[:8]), np.asarray(x[:8]))
    assert np.isnan(np.asarray(out[8:])).all()
