"""The attention_backend rule: "auto" picks the Pallas kernel only on GPU and only for shapes it takes."""

import jax
import jax.numpy as jnp
import pytest

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.attention import resolve_attention_backend
from pallas_kernels.ragged_paged_attention import supports


def test_kernel_shape_support():
    assert supports(32, 2, 128, jnp.bfloat16, 16)       # GLM-4-9B
    assert supports(9, 3, 64, jnp.bfloat16, 16)         # SmolLM2
    assert not supports(4, 2, 16, jnp.bfloat16, 16)     # head_dim not a multiple of 64
    assert not supports(32, 2, 128, jnp.float32, 16)    # f32 has no wgmma path here
    assert not supports(128, 1, 128, jnp.bfloat16, 16)  # GQA group 128 > 64 rows
    assert not supports(32, 2, 128, jnp.bfloat16, 12)   # page size not a multiple of 8


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_is_xla_off_gpu_and_explicit_choices_stand():
    config = ModelConfig.from_preset("glm-4-9b-0414")
    assert resolve_attention_backend("auto", config, jnp.bfloat16, 16) == "xla"
    assert resolve_attention_backend("pallas", config, jnp.bfloat16, 16) == "pallas"
    assert resolve_attention_backend("xla", config, jnp.bfloat16, 16) == "xla"
