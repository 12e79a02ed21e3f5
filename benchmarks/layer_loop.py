"""Where batch-1 decode time goes: the layer loop's handling of stacked weights, measured.

One decode step (T tokens, 1k context, Pallas or XLA attention) through all layers of a real model shape
(default GLM-4-9B-0414, random bf16 weights made on the device), written four ways:

- ``scan``:    ``lax.scan`` over weights stacked [L, ...] (the model's layout; each iteration dynamic-slices
               one layer's weights out of the stack);
- ``unroll``:  a Python loop over layers indexing the stacked arrays with constants;
- ``split``:   a Python loop over per-layer arrays that are separate buffers (no slicing at all).

Each variant is timed alone (one step per call) and inside a ``fori_loop`` of ``--loop`` steps (as in the
engine's multi-step decode), against the floor weights/bandwidth measured in the same run; the compiled
HLO's copies, dynamic-slices and GEMM custom calls are counted, so a layer-weight copy shows as bytes.

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/layer_loop.py
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _timing import copy_bandwidth, time_ms

from autoglm_jax.config import ModelConfig
from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.decoder import decoder_layer, layer_param_shapes
from autoglm_jax.model.layers import rms_norm
from autoglm_jax.tools.device_profile import profile_device

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-0414", "Preset (random weights).")
flags.DEFINE_list("tokens", ["1", "64"], "Decode rows (one token each).")
flags.DEFINE_list("variants", ["scan", "unroll", "split"], "Layer-loop variants.")
flags.DEFINE_string("backend", "pallas", "Attention backend.")
flags.DEFINE_integer("context", 1024, "Tokens already in the cache per row.")
flags.DEFINE_integer("loop", 8, "Steps per fori_loop call.")
flags.DEFINE_integer("page_size", 16, "KV page size.")
flags.DEFINE_bool("hlo_counts", True, "Count copies / dynamic-slices / GEMM calls in the compiled HLO.")
flags.DEFINE_bool("profile", False, "Profile one looped call per variant: device busy share and top kernels.")
flags.DEFINE_string("dump", None, "Directory to write each variant's compiled HLO text to.")


def hlo_summary(compiled_text: str) -> str:
    copies = len(re.findall(r"= \S+ copy\(", compiled_text)) + len(re.findall(r"kind=kLoop.*calls=%?[\w.]*copy", compiled_text))
    dyn = len(re.findall(r"dynamic-slice\(", compiled_text))
    gemm = len(re.findall(r'custom_call_target="__cublas\$gemm"', compiled_text))
    triton = len(re.findall(r'"kind":"__triton_gemm"|__triton_gemm', compiled_text))
    dsf = len(re.findall(r"dynamic_address_computation|dynamic_slice_fusion|address_computation", compiled_text))
    pallas = len(re.findall(r'custom_call_target="mosaic_gpu|__gpu\$xla\.gpu\.triton|mosaic_gpu', compiled_text))
    big = {}
    for line in compiled_text.splitlines():  # instructions whose result is >= 8 MB: where weight copies show
        m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (bf16|f32|s8|f8e4m3fn)\[([\d,]+)\]", line)
        if not m:
            continue
        size = int(np.prod([int(d) for d in m.group(3).split(",")])) * {"bf16": 2, "f32": 4}.get(m.group(2), 1)
        if size >= 8 << 20:
            kind = re.sub(r"[.\d]+$", "", m.group(1))
            big[kind] = big.get(kind, 0) + size
    top = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(big.items(), key=lambda kv: -kv[1])[:6])
    return (f"copies {copies} dynamic-slice {dyn} cublas-gemm {gemm} triton-gemm {triton} dyn-slice-fusion {dsf} "
            f"pallas {pallas}; results >= 8 MB: {top}")


def main(argv):
    del argv
    config = ModelConfig.from_preset(FLAGS.model)
    L, D, page = config.num_hidden_layers, config.head_dim, FLAGS.page_size
    bw = copy_bandwidth()
    shapes = layer_param_shapes(config)

    def init(key, shape, name):
        if name.endswith("norm"):
            return jnp.ones(shape, jnp.bfloat16)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)

    stacked = {n: jax.jit(lambda k, s=s, n=n: init(k, (L, *s), n))(jax.random.key(i)) for i, (n, s) in enumerate(shapes.items())}
    layer_bytes = sum(v.nbytes for v in stacked.values())
    print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"layer weights {layer_bytes / 1e9:.2f} GB -> floor {layer_bytes / bw * 1e3:.2f} ms/step", flush=True)

    for T in [int(t) for t in FLAGS.tokens]:
        pages_per_seq = -(-(FLAGS.context + FLAGS.loop + 1) // page)
        num_pages = T * pages_per_seq + 1
        kv_shape = (L, num_pages, page, config.num_key_value_heads, D)
        k = jax.jit(lambda key: jax.random.normal(key, kv_shape, jnp.bfloat16))(jax.random.key(100))
        v = jax.jit(lambda key: jax.random.normal(key, kv_shape, jnp.bfloat16))(jax.random.key(101))
        table = jnp.asarray(1 + np.arange(T)[:, None] * pages_per_seq + np.arange(pages_per_seq)[None], jnp.int32)
        x0 = jax.random.normal(jax.random.key(7), (T, config.hidden_size), jnp.bfloat16)

        def metadata(step):
            positions = jnp.full((T,), FLAGS.context, jnp.int32) + step
            slots = table[jnp.arange(T), positions // page] * page + positions % page
            return AttentionMetadata(seq_ids=jnp.arange(T, dtype=jnp.int32), positions=positions, slot_mapping=slots,
                                     page_table=table, context_lens=positions + 1,
                                     query_start_loc=jnp.arange(T + 1, dtype=jnp.int32),
                                     num_tokens=jnp.asarray(T, jnp.int32))

        def forward(variant, weights, x, k, v, step):
            md = metadata(step)
            if variant == "scan":
                def body(carry, inputs):
                    x, k, v = carry
                    w, layer = inputs
                    return decoder_layer(config, w, x, k, v, layer, md, FLAGS.backend), None
                (x, k, v), _ = jax.lax.scan(body, (x, k, v), (weights, jnp.arange(L, dtype=jnp.int32)))
            elif variant == "unroll":
                for layer in range(L):
                    w = {n: a[layer] for n, a in weights.items()}
                    x, k, v = decoder_layer(config, w, x, k, v, jnp.int32(layer), md, FLAGS.backend)
            else:  # split: weights is a list of per-layer dicts
                for layer, w in enumerate(weights):
                    x, k, v = decoder_layer(config, w, x, k, v, jnp.int32(layer), md, FLAGS.backend)
            return rms_norm(x, jnp.ones((config.hidden_size,), x.dtype), config.rms_norm_eps), k, v

        for variant in FLAGS.variants:
            weights = stacked
            if variant == "split":
                weights = [{n: jax.jit(lambda a, i=i: a[i])(a) for n, a in stacked.items()} for i in range(L)]
            one = jax.jit(lambda w, x, k, v, variant=variant: forward(variant, w, x, k, v, 0), donate_argnums=(2, 3))

            def looped(w, x, k, v, variant=variant):
                def body(i, carry):
                    x, k, v = carry
                    return forward(variant, w, x, k, v, i)
                return jax.lax.fori_loop(0, FLAGS.loop, body, (x, k, v))
            loop = jax.jit(looped, donate_argnums=(2, 3))
            start = time.perf_counter()
            compiled_one = one.lower(weights, x0, k, v).compile()
            compiled_loop = loop.lower(weights, x0, k, v).compile()
            compile_s = time.perf_counter() - start
            summary = ""
            if FLAGS.dump:
                import os
                os.makedirs(FLAGS.dump, exist_ok=True)
                with open(os.path.join(FLAGS.dump, f"{variant}_T{T}.txt"), "w") as f:
                    f.write(compiled_loop.as_text())
            if FLAGS.hlo_counts:
                summary = f"[one: {hlo_summary(compiled_one.as_text())}] [loop: {hlo_summary(compiled_loop.as_text())}]"
            state = {"k": k, "v": v}

            def run_one():
                x, state["k"], state["v"] = compiled_one(weights, x0, state["k"], state["v"])
                return x

            def run_loop():
                x, state["k"], state["v"] = compiled_loop(weights, x0, state["k"], state["v"])
                return x

            t_one = time_ms(run_one, iterations=10) / 1e3
            t_loop = time_ms(run_loop, iterations=2) / 1e3 / FLAGS.loop
            floor = layer_bytes / bw
            print(f"T={T:3d} {variant:7s}: one step {t_one * 1e3:7.2f} ms ({floor / t_one:.2f} of floor)  "
                  f"in loop {t_loop * 1e3:7.2f} ms/step ({floor / t_loop:.2f})  compile {compile_s:5.1f} s  {summary}",
                  flush=True)
            if FLAGS.profile:
                print("    " + profile_device(run_loop, warmup=0).format(14).replace("\n", "\n    "), flush=True)
            k, v = state["k"], state["v"]
            if variant == "split":
                del weights


if __name__ == "__main__":
    app.run(main)
