"""Quality of each quantization scheme against the float model: mean KL and top-1 agreement.

For SmolLM2-135M-Instruct (the embedded default model) and a tiny GLM (preset ``tiny-glm4``, random
weights): every position of a fixed prompt set is scored by KL(float || quantized) of the next-token
distribution and by whether the argmax agrees. Also shows int4 with calibrated clipping factors
(``quant.calibration``, fitted on a disjoint set of chat prompts). Not a test; prints a markdown table
to record in benchmarks/RESULTS.md. Perplexity is not reported (no text corpus ships in a PyPI package
we depend on).

    .venv/bin/python benchmarks/quant_quality.py [--schemes=int8,fp8,...] [--calibration_prompts=200]
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.quant import SCHEMES, quantize_model
from autoglm_jax.quant.calibration import CalibrationConfig, calibrate_model

FLAGS = flags.FLAGS
flags.DEFINE_list("schemes", list(SCHEMES), "Schemes to score.")
flags.DEFINE_integer("calibration_prompts", 200, "Chat prompts for calibration (0 = skip the calibrated row).")
flags.DEFINE_string("calibrated_scheme", "int4-g128", "Scheme of the calibrated row.")

EVAL_PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about autumn.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?", "Give three tips for better sleep.",
    "Summarise the plot of Romeo and Juliet.", "What is the difference between a virus and a bacterium?",
    "Translate 'good morning' into Spanish and German.", "Why is the sky blue?", "Describe how a bicycle works.",
    "What are prime numbers? Give examples.", "Write a short email asking for a meeting on Monday.",
    "How does compound interest work?", "List the planets of the solar system.", "What is machine learning?",
]
_TOPICS = ["the ocean", "volcanoes", "bread baking", "chess", "the Roman empire", "solar panels", "jazz",
           "honey bees", "black holes", "the stock market", "gardening", "electric cars", "the immune system",
           "origami", "coffee", "glaciers", "video games", "the printing press", "rainforests", "marathons"]
_ASKS = ["Tell me about {}.", "Write a short poem about {}.", "What are common misconceptions about {}?",
         "Explain {} to a ten-year-old.", "Give me five facts about {}.", "What is the history of {}?",
         "Write a product description related to {}.", "What questions should I ask an expert on {}?",
         "Compare {} with something similar.", "Write a tweet about {}."]
CALIBRATION_PROMPTS = [a.format(t) for a, t in itertools.product(_ASKS, _TOPICS)]  # 200, disjoint from EVAL
BUCKET = 64


def chat_token_ids(tokenizer, prompts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in prompts]


def all_logits(model, config, seqs):
    """float32 logits [sum(len), V] of every position of every sequence."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, cache, md):
        return nnx.merge(graphdef, state)(tokens, cache, md)[0]

    out = []
    for seq in seqs:
        n = len(seq)
        bucket = -(-n // BUCKET) * BUCKET
        pages = bucket // 16
        cache = KVCache.create(config, pages + 1, 16, jnp.float32)
        md = AttentionMetadata.build(np.array([0]), np.array([n]), np.arange(1, pages + 1, dtype=np.int32)[None], 16, bucket)
        tokens = np.zeros(bucket, np.int32)
        tokens[:n] = seq
        out.append(run(state, jnp.asarray(tokens), cache, md)[:n])
    return jnp.concatenate(out)


def kl_top1(ref, out):
    p, q = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(out, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))), float(jnp.mean(ref.argmax(-1) == out.argmax(-1)))


def clone(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def score(name, model, config, eval_seqs, calib_seqs):
    ref = all_logits(model, config, eval_seqs)
    rows = []
    for scheme in FLAGS.schemes:
        q = clone(model)
        quantize_model(q, scheme)
        rows.append((name, scheme, *kl_top1(ref, all_logits(q, config, eval_seqs))))
        print(f"  {name} {scheme}: KL {rows[-1][2]:.4g} top-1 {rows[-1][3]:.4f}", flush=True)
    if calib_seqs:
        scheme = FLAGS.calibrated_scheme
        start = time.perf_counter()
        clips, _ = calibrate_model(model, calib_seqs, scheme, CalibrationConfig())
        q = clone(model)
        quantize_model(q, scheme, clips)
        rows.append((name, f"{scheme} + calibration ({len(calib_seqs)} prompts, "
                           f"{time.perf_counter() - start:.0f} s)", *kl_top1(ref, all_logits(q, config, eval_seqs))))
        print(f"  {name} {rows[-1][1]}: KL {rows[-1][2]:.4g} top-1 {rows[-1][3]:.4f}", flush=True)
    return rows, int(ref.shape[0])


def main(argv):
    del argv
    from autoglm_jax.tokenizer_loading import load_tokenizer

    config, model, source = load_model(None, jnp.float32)
    tokenizer = load_tokenizer(None, source)
    eval_seqs = chat_token_ids(tokenizer, EVAL_PROMPTS)
    calib = chat_token_ids(tokenizer, CALIBRATION_PROMPTS[: FLAGS.calibration_prompts])
    rows, positions = score("SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", model, config, eval_seqs, calib)
    tconfig, tmodel, _ = load_model("tiny-glm4", jnp.float32, seed=1)
    rng = np.random.default_rng(0)
    tiny_eval = [rng.integers(3, tconfig.vocab_size, 48).tolist() for _ in range(16)]
    tiny_calib = [rng.integers(3, tconfig.vocab_size, 48).tolist() for _ in range(min(64, FLAGS.calibration_prompts))]
    tiny_rows, _ = score("tiny-glm4 (random weights)", tmodel, tconfig, tiny_eval, tiny_calib)
    print(f"\n{len(EVAL_PROMPTS)} chat prompts ({positions} positions) for SmolLM2; 16 x 48 random tokens for tiny-glm4; "
          f"jax {jax.__version__}, {jax.devices()[0].platform}\n")
    print("| model | scheme | mean KL(float ‖ quant) | top-1 agreement |\n|---|---|---|---|")
    for model_name, scheme, kl, top1 in rows + tiny_rows:
        print(f"| {model_name} | {scheme} | {kl:.2e} | {100 * top1:.1f}% |")


if __name__ == "__main__":
    app.run(main)
