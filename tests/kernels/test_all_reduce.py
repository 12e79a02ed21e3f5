"""The one-shot all-reduce kernel's wrapper on CPU: config checks, which messages it takes, its CUDA
lowering over a 2-device mesh (the GPU interpreter cannot run semaphores), and the psum fallback's sums.
The kernel's sums themselves are checked on the GPU (tests/test_gpu_backends.py)."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.all_reduce import AllReduceConfig, all_reduce_reference, default_config, supports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_blocks=0), "num_blocks"), (dict(chunk_bytes=1000), "chunk_bytes"), (dict(max_bytes=-1), "max_bytes")])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AllReduceConfig(**kwargs)


def test_supports_names_why_not():
    assert supports(jnp.zeros((1, 4096), jnp.bfloat16)) is None
    assert supports(jnp.zeros((64, 4096), jnp.float32)) is None
    assert "dtype" in supports(jnp.zeros((1, 4096), jnp.int32))
    assert "max_bytes" in supports(jnp.zeros((256, 4096), jnp.bfloat16))  # 2 MiB: NCCL's regime
    assert "multiple" in supports(jnp.zeros((1, 100), jnp.bfloat16))


def test_default_config_scales_blocks_with_size():
    assert default_config(8192).num_blocks == 1
    assert default_config(1 << 20).num_blocks == 32


def test_reference_sums_in_float32():
    rng = np.random.default_rng(0)
    shards = rng.standard_normal((4, 3, 256)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(all_reduce_reference(jnp.asarray(shards))), shards.sum(0), rtol=1e-6)


_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pallas_kernels.all_reduce import one_shot_all_reduce
    mesh = jax.make_mesh((2,), ("tp",))
    run = jax.jit(jax.shard_map(lambda x: one_shot_all_reduce(x, "tp"), mesh=mesh, in_specs=P("tp"),
                                out_specs=P("tp"), check_vma=False))
    # The kernel path, lowered for CUDA: one Mosaic GPU call using XLA's collective metadata.
    x = jax.ShapeDtypeStruct((2 * 4, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("tp")))
    text = run.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "mosaic_gpu" in line and "custom_call" in line]
    assert len(calls) == 1, len(calls)
    assert "uses_xla_collective_metadata = true" in calls[0]
    assert "stablehlo.all_reduce" not in text  # no NCCL collective beside it
    # A message the kernel does not take (int32) falls back to psum, which runs here.
    ints = np.arange(2 * 3 * 128, dtype=np.int32).reshape(6, 128)
    out = np.asarray(run(jax.device_put(ints, NamedSharding(mesh, P("tp")))))
    expected = ints[:3] + ints[3:]
    assert np.array_equal(out, np.concatenate([expected, expected])), out
    print("OK")
""")


def test_lowers_for_cuda_on_two_devices_and_falls_back_to_psum():
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
