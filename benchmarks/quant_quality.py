"""Quality of each quantization scheme against the float model: mean KL and top-1 agreement.

For SmolLM2-135M-Instruct (the embedded default model) and a tiny GLM (preset ``tiny-glm4``, random
weights): every distinct position of a fixed prompt set is scored by KL(float || quantized) of the
next-token distribution and by whether the argmax agrees (the chat template's shared system-prompt
positions count once, not once per prompt). Also scores calibrated rows (``quant.calibration``: optax-
learned clipping, then GPTQ; statistics from a disjoint set of chat prompts) with their mean layer-output
error against round-to-nearest, and optionally a breakdown of the KL by projection and by layer
(one projection type / one layer quantized at a time). Not a test; prints markdown tables to record in
benchmarks/RESULTS.md. Perplexity is not reported (no text corpus ships in a PyPI package we depend on).

    .venv/bin/python benchmarks/quant_quality.py [--schemes=int8,fp8,...] [--calibration_prompts=200]
        [--calibrated_schemes=int8,fp8,int4-g64,int4-g128] [--breakdown=int4-g64] [--tiny_only]
"""

from __future__ import annotations

import functools
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
from autoglm_jax.quant import SCHEMES, get_scheme, quantize_model
from autoglm_jax.quant.calibration import (CalibrationConfig, calibrate_params, collect_input_stats,
                                           shared_prefix_length)
from autoglm_jax.tree_paths import flatten

FLAGS = flags.FLAGS
flags.DEFINE_list("schemes", list(SCHEMES), "Schemes to score.")
flags.DEFINE_integer("calibration_prompts", 200, "Chat prompts for calibration (0 = skip the calibrated rows).")
flags.DEFINE_list("calibrated_schemes", ["int8", "fp8", "int4-g64", "int4-g128"], "Schemes with calibrated rows.")
flags.DEFINE_list("breakdown", [], "Schemes whose KL is broken down by projection and layer (SmolLM2, RTN and "
                  "calibrated; ~30 evaluations each).")
flags.DEFINE_bool("tiny_only", False, "Score only tiny-glm4 (random weights; no GGUF download needed).")

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


def distinct_positions(seqs) -> np.ndarray:
    """bool [sum(len)]: every position, but a prefix all sequences share only in the first one."""
    shared = shared_prefix_length(seqs) if len(seqs) > 1 else 0
    return np.concatenate([(np.arange(len(s)) >= shared) | (i == 0) for i, s in enumerate(seqs)])


def kl_top1(ref, out):
    p, q = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(out, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))), float(jnp.mean(ref.argmax(-1) == out.argmax(-1)))


def clone(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


class Scorer:
    """The float model's logits on the eval set, and KL / top-1 of any variant of the model against them."""

    def __init__(self, model, config, eval_seqs):
        self.model, self.config, self.seqs = model, config, eval_seqs
        self.keep = distinct_positions(eval_seqs)
        self.ref = all_logits(model, config, eval_seqs)[self.keep]

    def score(self, model):
        return kl_top1(self.ref, all_logits(model, self.config, self.seqs)[self.keep])

    def with_weights(self, weights: dict):
        """KL / top-1 with the float [L, K, N] weights at ``weights``' paths replaced (e.g. dequantized)."""
        model = clone(self.model)
        for path, value in weights.items():
            *parents, name = path.split("/")
            setattr(functools.reduce(getattr, parents, model), name, nnx.Param(value))
        return self.score(model)


def calibrated_rows(name, scorer, calib_seqs):
    """Rows of every calibrated scheme (clipping only; clipping + GPTQ) and {scheme: calibrated weights}."""
    start = time.perf_counter()
    grams, tokens = collect_input_stats(scorer.model, calib_seqs, "int8")
    stats_s = time.perf_counter() - start
    print(f"  {name}: input statistics of {len(calib_seqs)} prompts ({tokens} tokens) in {stats_s:.0f} s", flush=True)
    weights = flatten(nnx.to_pure_dict(nnx.state(scorer.model, nnx.Param)))
    rows, kept = [], {}
    for scheme in FLAGS.calibrated_schemes:
        for label, cfg in (("clip (optax)", CalibrationConfig(gptq=None)), ("clip (optax) + GPTQ", CalibrationConfig())):
            start = time.perf_counter()
            calibrated, report = calibrate_params(weights, grams, scheme, cfg)
            seconds = time.perf_counter() - start
            rtn = np.mean([r.mean() for r, _ in report.values()])
            cal = np.mean([c.mean() for _, c in report.values()])
            q = clone(scorer.model)
            quantize_model(q, scheme, calibrated)
            rows.append((name, f"{scheme} + {label}", *scorer.score(q), f"{rtn:.2e} → {cal:.2e} ({seconds:.0f} s)"))
            print(f"  {name} {rows[-1][1]}: KL {rows[-1][2]:.4g} top-1 {rows[-1][3]:.4f} layer error {rows[-1][4]}",
                  flush=True)
            kept[scheme] = calibrated
    return rows, kept


def score(name, model, config, eval_seqs, calib_seqs):
    scorer = Scorer(model, config, eval_seqs)
    rows = []
    for scheme in FLAGS.schemes:
        q = clone(model)
        quantize_model(q, scheme)
        rows.append((name, scheme, *scorer.score(q), ""))
        print(f"  {name} {scheme}: KL {rows[-1][2]:.4g} top-1 {rows[-1][3]:.4f}", flush=True)
    calibrated = {}
    if calib_seqs and FLAGS.calibrated_schemes:
        more, calibrated = calibrated_rows(name, scorer, calib_seqs)
        rows += more
    return rows, int(scorer.ref.shape[0]), scorer, calibrated


def breakdown(scorer, scheme, calibrated):
    """Markdown rows: KL / top-1 with one projection type (all layers), then one layer (all projections)
    quantized, round-to-nearest and (if given) calibrated."""
    floats = {p: getattr(scorer.model.layers, p.split("/")[1])[...] for p in ("layers/qkv", "layers/o", "layers/gate_up",
                                                                                 "layers/down")}
    variants = {"RTN": {p: get_scheme(scheme).fake_quantize(w) for p, w in floats.items()}}
    if calibrated:
        variants["calibrated"] = {p: calibrated[p].dequantize() for p in floats}
    lines = []
    for label, deq in variants.items():
        for path in floats:
            kl, top1 = scorer.with_weights({path: deq[path]})
            lines.append(f"| {scheme} {label} | {path} (all layers) | {kl:.2e} | {100 * top1:.1f}% |")
        layers = floats["layers/qkv"].shape[0]
        for layer in range(layers):
            kl, top1 = scorer.with_weights({p: w.at[layer].set(deq[p][layer]) for p, w in floats.items()})
            lines.append(f"| {scheme} {label} | layer {layer} (all projections) | {kl:.2e} | {100 * top1:.1f}% |")
            print(lines[-1], flush=True)
    return lines


def main(argv):
    del argv
    from autoglm_jax.tokenizer_loading import load_tokenizer

    rows, header, lines = [], [], []
    if not FLAGS.tiny_only:
        config, model, source = load_model(None, jnp.float32)
        tokenizer = load_tokenizer(None, source)
        eval_seqs = chat_token_ids(tokenizer, EVAL_PROMPTS)
        calib = chat_token_ids(tokenizer, CALIBRATION_PROMPTS[: FLAGS.calibration_prompts])
        rows, positions, scorer, calibrated = score("SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", model, config,
                                                    eval_seqs, calib)
        header.append(f"{len(EVAL_PROMPTS)} chat prompts ({positions} distinct positions) for SmolLM2")
        lines = [line for s in FLAGS.breakdown for line in breakdown(scorer, s, calibrated.get(s))]
    tconfig, tmodel, _ = load_model("tiny-glm4", jnp.float32, seed=1)
    rng = np.random.default_rng(0)
    tiny_eval = [rng.integers(3, tconfig.vocab_size, 48).tolist() for _ in range(16)]
    tiny_calib = [rng.integers(3, tconfig.vocab_size, 48).tolist() for _ in range(min(64, FLAGS.calibration_prompts))]
    tiny_rows, _, _, _ = score("tiny-glm4 (random weights)", tmodel, tconfig, tiny_eval, tiny_calib)
    header.append("16 x 48 random tokens for tiny-glm4")
    print(f"\n{'; '.join(header)}; jax {jax.__version__}, {jax.devices()[0].platform}\n")
    print("| model | scheme | mean KL(float ‖ quant) | top-1 agreement | layer output error RTN → calibrated |\n"
          "|---|---|---|---|---|")
    for model_name, scheme, kl, top1, err in rows + tiny_rows:
        print(f"| {model_name} | {scheme} | {kl:.2e} | {100 * top1:.1f}% | {err} |")
    if lines:
        print("\n| scheme | quantized | mean KL | top-1 |\n|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
