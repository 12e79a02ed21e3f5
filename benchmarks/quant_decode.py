"""Batch-1 decode tokens/s of bf16 against each quantization scheme, at GLM-4-9B shape, same run.

Random bf16 weights are made on the device (preset ``--model``), then each scheme quantizes the decoder's
linear projections (``quant.transform``) inside a fresh ``LLM`` with greedy, EOS-ignoring generation.
Decode speed is isolated from prefill and compilation by timing two generation lengths and dividing
the extra tokens by the extra time. Also reports offline throughput (``--offline_batch`` prompts at
once) of ``--offline_schemes`` under each of ``--matmul_backends`` against the best bf16 (with "auto", W8A8
decode steps of <= 128 tokens run ``pallas_kernels.w8a8_matmul``). Not a test; record the table in
benchmarks/RESULTS.md (card, jax). By default the engine holds one sequence (``max_batch_size=1``), so decode runs
the 1-row step program (the kernels pad the token to 8 rows); ``--decode_slots=8`` gives it the slots of a serving
engine, whose ladder runs one sequence in the 8-row program on a GPU (``engine.buckets``).

    PYTHONPATH=. python3 benchmarks/quant_decode.py --schemes=bf16,int8,fp8,int4,w8a8-fp8,w8a8-int8,q8_0,q4_0

Where a decode step's device time goes, per op kind (every kernel named: command buffers off):

    XLA_FLAGS=--xla_gpu_enable_command_buffer= PYTHONPATH=. python3 benchmarks/quant_decode.py \
      --schemes=bf16,int8 --matmul_backends=auto --offline_batch=0 --profile_tokens=32
"""

from __future__ import annotations

import gc
import time

import jax
from absl import app, flags

from autoglm_jax import LLM, SamplingParams
from autoglm_jax.tools.device_profile import profile_device

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "glm-4-9b-chat-hf", "Preset (random weights made on the device).")
flags.DEFINE_list("schemes", ["bf16", "int8", "fp8", "int4", "w8a8-int8", "w8a8-fp8"], "bf16 = no quantization.")
flags.DEFINE_list("matmul_backends", ["xla"], "Engine arg matmul_backend: each scheme runs with each (xla, pallas).")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
flags.DEFINE_integer("short", 32, "Tokens of the short generation.")
flags.DEFINE_integer("long", 288, "Tokens of the long generation.")
flags.DEFINE_integer("offline_batch", 64, "Prompts of the offline-throughput measurement (0 = skip).")
flags.DEFINE_list("offline_schemes", ["bf16", "w8a8-fp8"], "Schemes of the offline measurement.")
flags.DEFINE_integer("profile_tokens", 0, "If > 0: after each batch-1 decode timing, trace one untimed generation of "
                     "this many tokens and print the device ops merged by kind, in µs per token (where a decode step's "
                     "time goes; the prompt's one prefill call is in it too). Run with "
                     "XLA_FLAGS=--xla_gpu_enable_command_buffer= to see every kernel by name.")
flags.DEFINE_integer("profile_top", 30, "--profile_tokens: the op kinds printed.")
flags.DEFINE_integer("decode_slots", 1, "Engine max_batch_size of the batch-1 decode measurement (one sequence either "
                     "way): 1 runs the 1-row step program; >= 8 on a GPU the 8-row program a serving engine runs one "
                     "sequence in (engine.buckets).")


def _timed(llm, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def _engine(scheme, batch, matmul_backend="xla"):
    max_len = FLAGS.prompt_len + FLAGS.long + 16
    # A KV pool just large enough (not sized from free memory): the weights of the previous scheme's
    # engine may still be held by the allocator, and an 80 GB card has no room for two pools.
    return LLM(model=FLAGS.model, dtype="bfloat16", quantization=None if scheme == "bf16" else scheme,
               matmul_backend=matmul_backend, num_pages=batch * -(-max_len // 16) + 1, page_size=16,
               skip_tokenizer_init=True, max_batch_size=batch, max_model_len=max_len,
               max_num_batched_tokens=max(256, FLAGS.prompt_len), decode_steps_per_call=16, show_progress=False)


def decode_tokens_per_s(scheme, matmul_backend):
    llm = _engine(scheme, FLAGS.decode_slots, matmul_backend)
    prompt = [{"prompt_token_ids": list(range(10, 10 + FLAGS.prompt_len))}]
    _timed(llm, prompt, FLAGS.short)  # warm every path
    t_short, _ = _timed(llm, prompt, FLAGS.short)
    t_long, _ = _timed(llm, prompt, FLAGS.long)
    if FLAGS.profile_tokens:
        print(f"  {scheme} matmul_backend={matmul_backend}: " + _decode_profile(llm, prompt), flush=True)
    del llm
    gc.collect()
    return (FLAGS.long - FLAGS.short) / (t_long - t_short)


def _decode_profile(llm, prompt) -> str:
    """The device ops of one ``--profile_tokens`` generation, merged by kind, as µs per generated token."""
    tokens = FLAGS.profile_tokens
    profile = profile_device(lambda: _timed(llm, prompt, tokens), warmup=0, python_tracer=False).by_kind()
    if not profile.num_devices:
        return profile.format()
    lines = [f"trace of {tokens} tokens: device busy {profile.busy_ms * 1e3 / tokens:.1f} µs/token over a span of "
             f"{profile.span_ms * 1e3 / tokens:.1f}, {profile.num_kernels / tokens:.1f} kernels/token"]
    lines += [f"    {ms * 1e3 / tokens:8.2f} µs/token {calls / tokens:6.1f}/token  {name[:100]}"
              for name, ms, calls in profile.top(FLAGS.profile_top)]
    return "\n".join(lines)


def offline_tokens_per_s(scheme, matmul_backend):
    llm = _engine(scheme, FLAGS.offline_batch, matmul_backend)
    prompts = [{"prompt_token_ids": list(range(10 + i, 10 + i + FLAGS.prompt_len))} for i in range(FLAGS.offline_batch)]
    _timed(llm, prompts[:2], FLAGS.short)
    elapsed, tokens = _timed(llm, prompts, FLAGS.long)
    del llm
    gc.collect()
    return tokens / elapsed


def main(argv):
    del argv
    device = jax.devices()[0]
    print(f"{FLAGS.model}, random weights; {device.device_kind}; jax {jax.__version__}; prompt {FLAGS.prompt_len} "
          f"tokens; decode = ({FLAGS.long} - {FLAGS.short}) tokens / time difference", flush=True)
    decode = {}
    for scheme in FLAGS.schemes:
        for backend in FLAGS.matmul_backends:
            decode[scheme, backend] = decode_tokens_per_s(scheme, backend)
            print(f"  {scheme} matmul_backend={backend}: {decode[scheme, backend]:.1f} tok/s", flush=True)
    base = max((tps for (scheme, _), tps in decode.items() if scheme == "bf16"), default=None)
    print("\n| scheme | matmul_backend | batch-1 decode tok/s | vs the best bf16 |\n|---|---|---|---|")
    for (scheme, backend), tps in decode.items():
        print(f"| {scheme} | {backend} | {tps:.1f} | " + (f"{tps / base:.2f}x |" if base else "- |"))
    if FLAGS.offline_batch:
        offline = {}
        for scheme in FLAGS.offline_schemes:
            for backend in FLAGS.matmul_backends:
                offline[scheme, backend] = offline_tokens_per_s(scheme, backend)
                print(f"  offline {scheme} matmul_backend={backend}: {offline[scheme, backend]:.1f} tok/s", flush=True)
        base = max((tps for (scheme, _), tps in offline.items() if scheme == "bf16"), default=None)
        print(f"\n| scheme | matmul_backend | offline tok/s ({FLAGS.offline_batch} prompts x {FLAGS.long} tokens) "
              "| vs the best bf16 |\n|---|---|---|---|")
        for (scheme, backend), tps in offline.items():
            print(f"| {scheme} | {backend} | {tps:.1f} | " + (f"{tps / base:.2f}x |" if base else "- |"))


if __name__ == "__main__":
    app.run(main)
