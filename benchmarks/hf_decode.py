"""Hugging Face transformers decode baseline at a preset's shape: static cache + torch.compile.

Random bf16 weights on the GPU; decode tokens/s = (T_long - T_short) over the extra tokens, so the
prefill cancels out. Run it after benchmarks/decode.py has exited (JAX holds most GPU memory while it runs).

    python3 benchmarks/hf_decode.py --model=glm-4-9b-0414 --batch=1 --context=1024
"""

from __future__ import annotations

import time

import torch
import transformers
from absl import app, flags

from autoglm_jax.config import ModelConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-0414", "Preset.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("context", 1024, "Prompt tokens.")
flags.DEFINE_integer("tokens", 64, "Decode tokens in the long run (the short run takes 8).")


def hf_config(c: ModelConfig):
    """The transformers config of a preset's shape (random weights); a default pad id outside the preset's
    vocabulary (Glm4Config's 151329 vs tiny-glm4's 512) is dropped."""
    hf = _hf_config(c)
    if hf.pad_token_id is not None and hf.pad_token_id >= c.vocab_size:
        hf.pad_token_id = None
    return hf


def _hf_config(c: ModelConfig):
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
              max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)
    if c.architecture == "Glm4ForCausalLM":
        return transformers.Glm4Config(attention_bias=c.qkv_bias, **kw)
    if c.architecture == "GlmForCausalLM":
        return transformers.GlmConfig(attention_bias=c.qkv_bias, **kw)
    if c.architecture == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**kw)
    return transformers.LlamaConfig(**kw)


def main(argv):
    del argv
    config = ModelConfig.from_preset(FLAGS.model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, config.architecture)(hf_config(config)).to(torch.bfloat16).eval()
    # transformers' own recipe: a static cache makes generate() compile the decode forward itself
    # (CompileConfig: inductor, mode="reduce-overhead" = CUDA graphs), stepping the graphs safely; wrapping
    # model.forward in torch.compile by hand trips torch's CUDA-graph overwrite check on the in-place cache.
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    ids = torch.randint(0, config.vocab_size, (FLAGS.batch, FLAGS.context), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    start = time.perf_counter()
    run(8)
    run(FLAGS.tokens)
    compile_s = time.perf_counter() - start
    short, long = min(run(8) for _ in range(2)), min(run(FLAGS.tokens) for _ in range(2))
    ms_step = (long - short) / (FLAGS.tokens - 8) * 1e3
    print(f"| transformers static+compile | {FLAGS.batch} | {FLAGS.context} | {FLAGS.batch / ms_step * 1e3:.1f} | "
          f"{ms_step:.2f} | - | {compile_s:.1f} |  ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__})", flush=True)


if __name__ == "__main__":
    app.run(main)
