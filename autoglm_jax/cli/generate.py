"""``autoglm generate``: stream a completion (or chat reply) for one prompt to stdout.

Owns: the flags of this command. The absl ``main`` only builds the config and calls the library.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Preset name, Hugging Face directory, .gguf file or Orbax checkpoint "
                    "(default: the embedded SmolLM2-135M-Instruct).")
flags.DEFINE_string("prompt", "What is the capital of France?", "The prompt (a user message with --chat).")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling probability mass.")
flags.DEFINE_integer("top_k", -1, "Top-k sampling (-1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"], "Weights/compute dtype.")
flags.DEFINE_bool("chat", True, "Apply the model's chat template to --prompt (--nochat for raw completion).")
flags.DEFINE_string("system", None, "Optional system message with --chat.")
flags.DEFINE_integer("max_model_len", 2048, "max_sequence_length of the engine.")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"], "KV cache dtype: auto (the model's) "
                  "or fp8 (= fp8_e4m3: float8 e4m3fn pages, no scales).")
flags.DEFINE_string("quantization", None, "Quantize the decoder's linear projections after loading (int8, fp8, "
                    "w8a8-int8, w8a8-fp8, int4, int4-g64, int4-g128, q8_0, q4_0, q4_1).")
flags.DEFINE_enum("matmul_backend", "auto", ["auto", "xla", "pallas"], "Decoder projections: auto (on GPU the "
                  "Pallas kernels for int8 / fp8 / int4 weights, and for bf16 ones where this card's tuning table "
                  "measured them faster than XLA; else XLA), XLA dots, or the Pallas "
                  "matmul kernels (bf16 / int8 / fp8 weights on GPU; XLA where a shape does not fit).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from autoglm_jax.engine.core import EngineCore
    from autoglm_jax.sampling_params import SamplingParams

    start = time.perf_counter()
    core = EngineCore(model=FLAGS.model, dtype=FLAGS.dtype, seed=FLAGS.seed, max_batch_size=1,
                      max_sequence_length=FLAGS.max_model_len, max_num_batched_tokens=256,
                      quantization=FLAGS.quantization, matmul_backend=FLAGS.matmul_backend,
                      kv_cache_dtype=FLAGS.kv_cache_dtype)
    print(f"[autoglm] model ready in {time.perf_counter() - start:.1f} s "
          f"(compiled {core.runner.num_traces} step variants in {core.warmup_seconds:.1f} s)", file=sys.stderr)
    prompt = FLAGS.prompt
    if FLAGS.chat:
        if core.tokenizer is None or core.tokenizer.chat_template is None:
            raise app.UsageError("this model has no chat template: use --nochat")
        messages = ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = {"prompt_token_ids": core.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=True)}
    params = SamplingParams(max_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                            top_k=FLAGS.top_k, seed=FLAGS.seed)
    core.add_request(prompt, params)
    printed, tokens, start = 0, 0, time.perf_counter()
    while core.has_unfinished_requests():
        for output in core.step():
            completion = output.outputs[0]
            sys.stdout.write(completion.text[printed:])
            sys.stdout.flush()
            printed, tokens = len(completion.text), len(completion.token_ids)
    elapsed = time.perf_counter() - start
    print(f"\n[autoglm] {tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tok/s)", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
