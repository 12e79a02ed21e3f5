"""On the GPU, the Pallas attention path gives the same greedy tokens as the plain-XLA path: SmolLM2's
shape (random weights: the 98 MB GGUF cannot travel to the GPU machine, whose uploads stop at 64 MiB and
which has no network) and a tiny GLM-4-0414 checkpoint whose head shapes the kernel takes; and the
layers unrolled over per-layer weight buffers (the GPU default) give what the scanned layers give.

Random bf16 weights give near-flat next-token distributions, so two correct paths that round differently
may pick different tokens at a near-tie; the comparison is vLLM's ``check_logprobs_close``: sequences
agree until the first differing token, and there each path's token must be in the other's top-5."""

import pytest

from autoglm_jax import LLM, SamplingParams
from tests.hf_tiny import save_tiny
from tests.test_matmul_backend import record_kernel_calls

pytestmark = pytest.mark.gpu
KW = dict(dtype="bfloat16", max_model_len=256, max_batch_size=4, max_num_batched_tokens=64,
          decode_steps_per_call=8, compilation_cache_dir=None, show_progress=False,
          num_pages=80)  # not sized from free memory: an engine not yet garbage-collected would starve the next


def _greedy(model, prompts, backend, **extra):
    """[(token ids, [top-5 token-id set per position])] of each prompt, greedy."""
    llm = LLM(model, attention_backend=backend, **{**KW, **extra})
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    return [(list(o.token_ids), [set(lp) for lp in o.logprobs]) for o in outs]


def assert_greedy_close(a, b):
    """Equal tokens up to the first difference, where each side's token is in the other's top-5."""
    for seq, ((tokens_a, top_a), (tokens_b, top_b)) in enumerate(zip(a, b)):
        assert len(tokens_a) == len(tokens_b)
        for i, (x, y) in enumerate(zip(tokens_a, tokens_b)):
            if x != y:
                assert x in top_b[i] and y in top_a[i], f"sequence {seq} position {i}: {x} vs {y} not a near-tie"
                break


def test_smollm2_shape_pallas_equals_xla():
    prompts = [{"prompt_token_ids": [1, 504, 3575, 282, 4649, 314]}, {"prompt_token_ids": list(range(100, 190))}]
    assert_greedy_close(_greedy("smollm2-135m-instruct", prompts, "pallas", skip_tokenizer_init=True),
                        _greedy("smollm2-135m-instruct", prompts, "xla", skip_tokenizer_init=True))


def test_tiny_glm4_pallas_equals_xla(tmp_path):
    save_tiny("Glm4ForCausalLM", tmp_path, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
              hidden_size=128, intermediate_size=256)
    prompts = [{"prompt_token_ids": [5, 17, 42, 7, 99, 3, 11]}, {"prompt_token_ids": list(range(20, 60))}]
    pallas = _greedy(str(tmp_path), prompts, "pallas")  # layers unrolled over per-layer weights (GPU default)
    assert_greedy_close(pallas, _greedy(str(tmp_path), prompts, "xla"))
    assert_greedy_close(pallas, _greedy(str(tmp_path), prompts, "pallas", scan_layers=True))


def test_tiny_glm4_pallas_matmul_equals_xla(tmp_path, monkeypatch):
    """matmul_backend='pallas' (bf16 weights, then int8 ones) gives the XLA projections' greedy tokens, and
    the Pallas matmul kernels really run."""
    kernel_calls = record_kernel_calls(monkeypatch)
    save_tiny("Glm4ForCausalLM", tmp_path, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
              hidden_size=128, intermediate_size=256)
    prompts = [{"prompt_token_ids": [5, 17, 42, 7, 99, 3, 11]}, {"prompt_token_ids": list(range(20, 60))}]
    for quantization in (None, "int8"):
        assert_greedy_close(_greedy(str(tmp_path), prompts, "pallas", matmul_backend="pallas", quantization=quantization),
                            _greedy(str(tmp_path), prompts, "pallas", quantization=quantization))
    assert {name for name, _, _ in kernel_calls} == {"matmul", "quantized_matmul"}


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_one_shot_all_reduce_sums_over_gpus(rows):
    """The one-shot all-reduce kernel over every local GPU (needs >= 2): the float32 sum to bf16
    rounding, bit-identical on every shard (TP shards must agree)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pallas_kernels.all_reduce import one_shot_all_reduce, supports

    n = jax.device_count()
    if n < 2:
        pytest.skip("needs two or more GPUs")
    mesh = jax.make_mesh((n,), ("tp",))
    x = jax.random.normal(jax.random.key(rows), (n * rows, 4096), jnp.float32).astype(jnp.bfloat16)
    assert supports(x[:rows]) is None
    run = jax.jit(jax.shard_map(lambda v: one_shot_all_reduce(v, "tp"), mesh=mesh, in_specs=P("tp"),
                                out_specs=P("tp"), check_vma=False))
    out = np.asarray(run(jax.device_put(x, NamedSharding(mesh, P("tp")))).astype(jnp.float32)).reshape(n, rows, -1)
    ref = np.asarray(x.astype(jnp.float32)).reshape(n, rows, -1).sum(0)
    for shard in range(1, n):
        assert np.array_equal(out[shard], out[0])
    assert np.linalg.norm(out[0] - ref) / np.linalg.norm(ref) < 4e-3


def test_glm4_9b_width_auto_matmul_equals_xla(tmp_path, monkeypatch):
    """The default matmul_backend ("auto") at GLM-4-9B's projection widths (two layers, random weights): the bf16
    decode kernel runs exactly where this card's tuning table measured it faster than XLA's dot, and the
    greedy tokens are XLA's."""
    from pallas_kernels import matmul as bf16_matmul

    kernel_calls = record_kernel_calls(monkeypatch)
    save_tiny("Glm4ForCausalLM", tmp_path, head_dim=128, num_attention_heads=32, num_key_value_heads=2,
              hidden_size=4096, intermediate_size=13696, num_hidden_layers=2, vocab_size=1024)
    prompts = [{"prompt_token_ids": [5, 17, 42, 7, 99, 3, 11]}, {"prompt_token_ids": list(range(20, 60))}]
    auto = _greedy(str(tmp_path), prompts, "pallas", matmul_backend="auto")
    assert_greedy_close(auto, _greedy(str(tmp_path), prompts, "pallas", matmul_backend="xla"))
    # (K, N) of qkv, o_proj, gate_up, down; decode runs 8 rows on a GPU (the M8 entries)
    faster = {(k, n) for k, n in ((4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096))
              if bf16_matmul.beats_xla(8, k, n, "bfloat16")}
    assert {w for name, _, w in kernel_calls if name == "matmul"} == faster
