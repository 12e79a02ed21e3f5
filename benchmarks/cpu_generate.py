"""CPU generation throughput of the default model (SmolLM2-135M-Instruct GGUF): ours vs transformers.

Same machine, same run, same prompts, greedy, EOS ignored so both produce exactly --max_tokens.
Prints tokens/s for one stream and for a batch of --batch prompts. Not a test (no assertions);
record the table in benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/cpu_generate.py --max_tokens=128 --batch=8
"""

from __future__ import annotations

import os
import platform
import time

import jax
import torch
import transformers
from absl import app, flags

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.default_model import default_model_path

FLAGS = flags.FLAGS
flags.DEFINE_integer("max_tokens", 128, "Tokens generated per prompt.")
flags.DEFINE_integer("batch", 8, "Prompts in the batched measurement.")
flags.DEFINE_string("dtype", "float32", "Dtype for both engines.")

PROMPTS = ["Write a story about a robot who learns to paint.", "Explain how vaccines work.",
           "List ten facts about the moon.", "Describe the water cycle.", "How do airplanes fly?",
           "Give advice for a job interview.", "What is machine learning?", "Describe a busy market."]


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True)


def bench_ours(prompts, max_tokens):
    llm = LLM(dtype=FLAGS.dtype, max_model_len=1024, max_batch_size=max(len(prompts), 1),
              max_num_batched_tokens=256, decode_steps_per_call=16, show_progress=False)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": chat_ids(tokenizer, p)} for p in prompts]
    llm.generate(inputs[:1], params, use_tqdm=False)  # warm the path (buckets are compiled already)
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def bench_transformers(prompts, max_tokens):
    path = default_model_path()
    dtype = getattr(torch, FLAGS.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**tokenizer(texts[:1], return_tensors="pt", add_special_tokens=False), max_new_tokens=4)
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / elapsed


def main(argv):
    del argv
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}, transformers {transformers.__version__}; "
          f"dtype {FLAGS.dtype}, {FLAGS.max_tokens} tokens per prompt")
    rows = []
    for name, prompts in (("batch 1", PROMPTS[:1]), (f"batch {FLAGS.batch}", (PROMPTS * 4)[: FLAGS.batch])):
        ours = bench_ours(prompts, FLAGS.max_tokens)
        theirs = bench_transformers(prompts, FLAGS.max_tokens)
        rows.append((name, ours, theirs))
    print("\n| workload | autoglm-jax tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    app.run(main)
