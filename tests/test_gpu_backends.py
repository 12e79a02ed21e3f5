"""On the GPU, the Pallas attention path gives the same greedy tokens as the plain-XLA path: SmolLM2's
shape (random weights: the 98 MB GGUF cannot travel to the GPU machine, whose uploads stop at 64 MiB and
which has no network) and a tiny GLM-4-0414 checkpoint whose head shapes the kernel takes."""

import pytest

from autoglm_jax import LLM, SamplingParams
from tests.hf_tiny import save_tiny

pytestmark = pytest.mark.gpu
KW = dict(dtype="bfloat16", max_model_len=256, max_batch_size=4, max_num_batched_tokens=64,
          decode_steps_per_call=8, compilation_cache_dir=None, show_progress=False)


def _greedy(model, prompts, backend, **extra):
    llm = LLM(model, attention_backend=backend, **KW, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_smollm2_shape_pallas_equals_xla():
    prompts = [{"prompt_token_ids": [1, 504, 3575, 282, 4649, 314]}, {"prompt_token_ids": list(range(100, 190))}]
    assert (_greedy("smollm2-135m-instruct", prompts, "pallas", skip_tokenizer_init=True)
            == _greedy("smollm2-135m-instruct", prompts, "xla", skip_tokenizer_init=True))


def test_tiny_glm4_pallas_equals_xla(tmp_path):
    save_tiny("Glm4ForCausalLM", tmp_path, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
              hidden_size=128, intermediate_size=256)
    prompts = [{"prompt_token_ids": [5, 17, 42, 7, 99, 3, 11]}, {"prompt_token_ids": list(range(20, 60))}]
    assert _greedy(str(tmp_path), prompts, "pallas") == _greedy(str(tmp_path), prompts, "xla")
