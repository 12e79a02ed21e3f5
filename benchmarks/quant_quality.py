"""Quality of each quantization scheme against the float model: mean KL, top-1 agreement with its
binomial standard error, and which positions flip.

SmolLM2-135M-Instruct (the embedded default model): the eval text is ``EVAL_PROMPTS`` in the chat
template followed by the float model's own greedy continuation (``--eval_tokens``), so most positions
are the assistant text the model really produces; every distinct position is scored by KL(float ||
quantized) of the next-token distribution and by whether the argmax agrees (the shared system-prompt
prefix counts once, not once per prompt). Calibration (``quant.calibration``) runs on a disjoint set of
chat prompts (``calibration_prompts``: task templates x topics, none of them an eval prompt) with the
float model's greedy continuations too. A tiny GLM (preset ``tiny-glm4``, random weights) is scored on
random tokens. Optionally a breakdown of the KL by projection and by layer (one projection type / one
layer quantized at a time). Not a test; prints markdown tables to record in benchmarks/RESULTS.md.
Perplexity is not reported (no text corpus ships in a PyPI package we depend on).

    .venv/bin/python benchmarks/quant_quality.py [--schemes=int8,fp8,...] [--calibration_prompts=256]
        [--calibrated_schemes=int8,fp8,int4-g64,int4-g128] [--ablations] [--breakdown=int4-g64] [--tiny_only]
        [--kv_cache_dtypes=fp8]
"""

from __future__ import annotations

import functools
import itertools
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from autoglm_jax.checkpoint.loader import load_model
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache, resolve_kv_cache_dtype
from autoglm_jax.quant import SCHEMES, get_scheme, quantize_model
from autoglm_jax.quant.activation_stats import collect_input_stats, shared_prefix_length
from autoglm_jax.quant.awq import SCALED_FAMILIES
from autoglm_jax.quant.calibration import AWQ_ALPHAS, CalibrationConfig, calibrate_params
from autoglm_jax.quant.gptq import GPTQConfig
from autoglm_jax.tree_paths import flatten

FLAGS = flags.FLAGS
flags.DEFINE_list("schemes", list(SCHEMES), "Schemes to score (round-to-nearest).")
flags.DEFINE_integer("eval_tokens", 96, "Greedy tokens the float model adds to each eval prompt.")
flags.DEFINE_integer("calibration_prompts", 256, "Chat prompts for calibration (0 = skip the calibrated rows).")
flags.DEFINE_integer("calibration_tokens", 112, "Greedy tokens the float model adds to each calibration prompt.")
flags.DEFINE_list("calibrated_schemes", ["int8", "fp8", "int4-g64", "int4-g128"], "Schemes with calibrated rows.")
flags.DEFINE_bool("ablations", False, "Also score calibration with parts left out (GPTQ alone, no AWQ, ...).")
flags.DEFINE_list("breakdown", [], "Schemes whose KL is broken down by projection and layer (SmolLM2, RTN and "
                  "calibrated; ~30 evaluations each).")
flags.DEFINE_bool("tiny_only", False, "Score only tiny-glm4 (random weights; no GGUF download needed).")
flags.DEFINE_list("kv_cache_dtypes", [], "Also score the float model, and each of --schemes (round-to-nearest), "
                  "with a KV cache of this engine kv_cache_dtype (e.g. fp8): every attention reads K/V from it.")

EVAL_PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about autumn.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?", "Give three tips for better sleep.",
    "Summarise the plot of Romeo and Juliet.", "What is the difference between a virus and a bacterium?",
    "Translate 'good morning' into Spanish and German.", "Why is the sky blue?", "Describe how a bicycle works.",
    "What are prime numbers? Give examples.", "Write a short email asking for a meeting on Monday.",
    "How does compound interest work?", "List the planets of the solar system.", "What is machine learning?",
    "Write a limerick about a cat who loves cheese.", "How do I make a cup of green tea?",
    "What is the Pythagorean theorem? Show an example.", "Write a SQL query that counts the rows of a table.",
    "Why do leaves change colour in the fall?", "Give me a packing list for a weekend camping trip.",
    "Who was Marie Curie?", "What is the difference between weather and climate?",
    "Write a JavaScript function that adds two numbers.", "How can I improve my public speaking?",
    "Explain what a black hole is to a child.", "What are the main causes of inflation?",
    "Write a thank-you note to a teacher.", "How many minutes are in a week? Show the steps.",
    "Describe the water cycle.", "What should I consider when adopting a dog?",
]
_TOPICS = ["the ocean", "volcanoes", "bread baking", "chess", "the Roman empire", "solar panels", "jazz",
           "honey bees", "black holes", "the stock market", "gardening", "electric cars", "the immune system",
           "origami", "coffee", "glaciers", "video games", "the printing press", "rainforests", "marathons",
           "sorting algorithms", "the French revolution", "vaccines", "penguins", "the moon landing", "recycling",
           "quantum computers", "ancient Egypt", "yoga", "bicycles", "earthquakes", "the internet", "pizza",
           "photography", "dinosaurs", "climate change", "the human heart", "trains", "libraries", "mushrooms",
           "friendship", "job interviews", "budgeting", "birthday parties", "public transport", "robots",
           "the Olympic games", "space telescopes", "chocolate", "spiders", "wind energy", "the Renaissance",
           "hash tables", "sleep", "tea ceremonies", "deserts", "smartphones", "volunteering", "sharks", "poetry"]
_ASKS = ["Tell me about {}.", "Write a short poem about {}.", "What are common misconceptions about {}?",
         "Explain {} to a ten-year-old.", "Give me five facts about {}.", "What is the history of {}?",
         "Write a product description related to {}.", "What questions should I ask an expert on {}?",
         "Compare {} with something similar.", "Write a tweet about {}.", "Write a Python function related to {}.",
         "Write a short story involving {}.", "What are the pros and cons of {}?",
         "Summarise the key ideas of {} in three bullet points.", "Translate a sentence about {} into French.",
         "Write a quiz with three questions about {}.", "How would you explain {} in one paragraph?",
         "Write a formal email to a colleague about {}.", "Give step-by-step instructions for a task related to {}.",
         "What is a fun fact about {}?", "Write a dialogue between two friends discussing {}.",
         "What math problem could involve {}? Solve it.", "Give advice to a beginner interested in {}.",
         "Describe {} using only simple words.", "Write a news headline and a short article about {}.",
         "What would the future of {} look like?", "List the main vocabulary words related to {}.",
         "Why do people care about {}?", "Write a riddle whose answer is {}.",
         "What are three surprising statistics about {}?"]
BUCKET = 64


def calibration_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` task x topic prompts (of 1,800), in a fixed shuffled order; never an eval prompt."""
    pairs = list(itertools.product(_ASKS, _TOPICS))
    random.Random(seed).shuffle(pairs)
    prompts = [ask.format(topic) for ask, topic in pairs[:count]]
    if set(prompts) & set(EVAL_PROMPTS):
        raise ValueError(f"calibration prompts overlap the eval prompts: {sorted(set(prompts) & set(EVAL_PROMPTS))}")
    return prompts


def chat_token_ids(tokenizer, prompts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in prompts]


def with_greedy_continuations(prompt_ids, max_tokens: int) -> list[list[int]]:
    """Each prompt followed by the float default model's greedy continuation (up to ``max_tokens``)."""
    from autoglm_jax import LLM, SamplingParams

    if max_tokens <= 0:
        return [list(p) for p in prompt_ids]
    llm = LLM(dtype="float32", max_model_len=max(map(len, prompt_ids)) + max_tokens, max_batch_size=32,
              max_num_batched_tokens=512, decode_steps_per_call=16, show_progress=False, compilation_cache_dir=None)
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(p) + list(o.outputs[0].token_ids) for p, o in zip(prompt_ids, outputs)]


def all_logits(model, config, seqs, cache_dtype=jnp.float32):
    """float32 logits [sum(len), V] of every position of every sequence (K/V read back from a cache of
    ``cache_dtype``)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, cache, md):
        return nnx.merge(graphdef, state)(tokens, cache, md)[0]

    out = []
    for seq in seqs:
        n = len(seq)
        bucket = -(-n // BUCKET) * BUCKET
        pages = bucket // 16
        cache = KVCache.create(config, pages + 1, 16, cache_dtype)
        md = AttentionMetadata.build(np.array([0]), np.array([n]), np.arange(1, pages + 1, dtype=np.int32)[None], 16, bucket)
        tokens = np.zeros(bucket, np.int32)
        tokens[:n] = seq
        out.append(run(state, jnp.asarray(tokens), cache, md)[:n])
    return jnp.concatenate(out)


def distinct_positions(seqs) -> np.ndarray:
    """bool [sum(len)]: every position, but a prefix all sequences share only in the first one."""
    shared = shared_prefix_length(seqs) if len(seqs) > 1 else 0
    return np.concatenate([(np.arange(len(s)) >= shared) | (i == 0) for i, s in enumerate(seqs)])


@jax.jit
def _compare(ref, out):
    """Per position: KL(ref || out), argmax agreement, and ref's top-1 minus top-2 probability."""
    p, q = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(out, -1)
    top2 = jax.lax.top_k(jnp.exp(p), 2)[0]
    return jnp.sum(jnp.exp(p) * (p - q), -1), ref.argmax(-1) == out.argmax(-1), top2[:, 0] - top2[:, 1]


class Score:
    """KL / top-1 of one variant over n positions, with the float model's margins at flipped positions."""

    def __init__(self, kl, agree, margin):
        self.kl, self.agree, self.margin = float(np.mean(kl)), np.asarray(agree), np.asarray(margin)
        self.top1 = float(self.agree.mean())
        self.top1_se = float(np.sqrt(self.top1 * (1 - self.top1) / len(self.agree)))

    def flips(self) -> str:
        """Where the argmax flipped: how many, and how close the float model's top two were there."""
        gaps = self.margin[~self.agree]
        if not len(gaps):
            return "no flips"
        return (f"{len(gaps)} flips; float top-1 - top-2 prob at flips: median {np.median(gaps):.3f}, "
                f"{np.mean(gaps < 0.1):.0%} < 0.1 (all positions: {np.mean(self.margin < 0.1):.0%} < 0.1)")


def clone(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


class Scorer:
    """The float model's logits on the eval set, and KL / top-1 of any variant of the model against them."""

    def __init__(self, model, config, eval_seqs):
        self.model, self.config, self.seqs = model, config, eval_seqs
        self.keep = distinct_positions(eval_seqs)
        self.ref = all_logits(model, config, eval_seqs)[self.keep]

    def score(self, model, cache_dtype=jnp.float32) -> Score:
        return Score(*_compare(self.ref, all_logits(model, self.config, self.seqs, cache_dtype)[self.keep]))

    def with_weights(self, weights: dict) -> Score:
        """Score with the float [L, K, N] weights at ``weights``' paths replaced (e.g. dequantized)."""
        model = clone(self.model)
        for path, value in weights.items():
            *parents, name = path.split("/")
            setattr(functools.reduce(getattr, parents, model), name, nnx.Param(value))
        return self.score(model)


def calibration_variants(scheme: str) -> list[tuple[str, CalibrationConfig]]:
    """(label, config): the default calibration, and with --ablations parts of it left out or added."""
    full = ("clip search/optax + GPTQ + refit", CalibrationConfig())
    if not FLAGS.ablations:
        return [full]
    variants = [("GPTQ only (RTN grid)", CalibrationConfig(steps=0, search=0, refit=False)),
                ("clip search/optax, no GPTQ", CalibrationConfig(gptq=None)),
                ("all, GPTQ damp 0.1", CalibrationConfig(gptq=GPTQConfig(damp=0.1)))]
    if get_scheme(scheme).family in SCALED_FAMILIES:  # input scales exist only for these
        variants.append(("all + AWQ input scales", CalibrationConfig(awq_alphas=AWQ_ALPHAS)))
    return variants + [full]


def calibrated_rows(name, scorer, calib_seqs):
    """Rows of every calibrated scheme and {scheme: calibrated weights} (of the full calibration)."""
    start = time.perf_counter()
    grams, tokens = collect_input_stats(scorer.model, calib_seqs, "int8")
    print(f"  {name}: input statistics of {len(calib_seqs)} sequences ({tokens} positions) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    weights = flatten(nnx.to_pure_dict(nnx.state(scorer.model, nnx.Param)))
    rows, kept = [], {}
    for scheme in FLAGS.calibrated_schemes:
        for label, cfg in calibration_variants(scheme):
            start = time.perf_counter()
            calibrated, report = calibrate_params(weights, grams, scheme, cfg)
            seconds = time.perf_counter() - start
            rtn = np.mean([r.mean() for r, _ in report.values()])
            cal = np.mean([c.mean() for _, c in report.values()])
            q = clone(scorer.model)
            quantize_model(q, scheme, calibrated)
            rows.append((name, f"{scheme} + {label}", scorer.score(q), f"{rtn:.2e} → {cal:.2e} ({seconds:.0f} s)"))
            print(f"  {_line(rows[-1])}\n    {rows[-1][2].flips()}", flush=True)
            kept[scheme] = calibrated
    return rows, kept


def _line(row) -> str:
    model_name, scheme, s, err = row
    return f"| {model_name} | {scheme} | {s.kl:.2e} | {100 * s.top1:.1f}% ± {100 * s.top1_se:.1f} | {err} |"


def score(name, model, config, eval_seqs, calib_seqs):
    scorer = Scorer(model, config, eval_seqs)
    rows = []
    for scheme in FLAGS.schemes:
        q = clone(model)
        quantize_model(q, scheme)
        rows.append((name, scheme, scorer.score(q), ""))
        print(f"  {_line(rows[-1])}\n    {rows[-1][2].flips()}", flush=True)
    for setting in FLAGS.kv_cache_dtypes:
        cache_dtype = resolve_kv_cache_dtype(setting, jnp.float32)
        for scheme in [None, *FLAGS.schemes]:
            q = clone(model)
            if scheme:
                quantize_model(q, scheme)
            rows.append((name, f"{scheme or 'float weights'}, {setting} KV cache", scorer.score(q, cache_dtype), ""))
            print(f"  {_line(rows[-1])}\n    {rows[-1][2].flips()}", flush=True)
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
            s = scorer.with_weights({path: deq[path]})
            lines.append(f"| {scheme} {label} | {path} (all layers) | {s.kl:.2e} | {100 * s.top1:.1f}% |")
        layers = floats["layers/qkv"].shape[0]
        for layer in range(layers):
            s = scorer.with_weights({p: w.at[layer].set(deq[p][layer]) for p, w in floats.items()})
            lines.append(f"| {scheme} {label} | layer {layer} (all projections) | {s.kl:.2e} | {100 * s.top1:.1f}% |")
            print(lines[-1], flush=True)
    return lines


def main(argv):
    del argv
    from autoglm_jax.tokenizer_loading import load_tokenizer

    start = time.perf_counter()
    rows, header, lines = [], [], []
    if not FLAGS.tiny_only:
        config, model, source = load_model(None, jnp.float32)
        tokenizer = load_tokenizer(None, source)
        eval_seqs = with_greedy_continuations(chat_token_ids(tokenizer, EVAL_PROMPTS), FLAGS.eval_tokens)
        calib = []
        if FLAGS.calibration_prompts:
            prompts = chat_token_ids(tokenizer, calibration_prompts(FLAGS.calibration_prompts))
            calib = with_greedy_continuations(prompts, FLAGS.calibration_tokens)
        print(f"  eval and calibration text generated ({time.perf_counter() - start:.0f} s)", flush=True)
        rows, positions, scorer, calibrated = score("SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", model, config,
                                                    eval_seqs, calib)
        header.append(f"{len(EVAL_PROMPTS)} chat prompts + {FLAGS.eval_tokens} greedy tokens ({positions} distinct "
                      f"positions) for SmolLM2, calibration on {len(calib)} other prompts + {FLAGS.calibration_tokens}")
        lines = [line for s in FLAGS.breakdown for line in breakdown(scorer, s, calibrated.get(s))]
    tconfig, tmodel, _ = load_model("tiny-glm4", jnp.float32, seed=1)
    rng = np.random.default_rng(0)
    tiny_eval = [rng.integers(3, tconfig.vocab_size, 48).tolist() for _ in range(16)]
    tiny_calib = [rng.integers(3, tconfig.vocab_size, 48).tolist() for _ in range(min(64, FLAGS.calibration_prompts))]
    tiny_rows, _, _, _ = score("tiny-glm4 (random weights)", tmodel, tconfig, tiny_eval, tiny_calib)
    header.append("16 x 48 random tokens for tiny-glm4")
    print(f"\n{'; '.join(header)}; jax {jax.__version__}, {jax.devices()[0].platform}; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print("| model | scheme | mean KL(float ‖ quant) | top-1 agreement ± s.e. | layer output error RTN → calibrated |\n"
          "|---|---|---|---|---|")
    print("\n".join(_line(row) for row in rows + tiny_rows))
    if lines:
        print("\n| scheme | quantized | mean KL | top-1 |\n|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
