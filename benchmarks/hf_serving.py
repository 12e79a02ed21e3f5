"""Transformers' continuous batching on the same random-weight model shape and workload as ``serving.py``.

The baseline row of the serving table: the manager behind ``model.generate_batch`` (transformers 5.x:
``continuous_batching_context_manager`` -> ``add_request`` -> ``get_result``, which is what
``generate_batch`` runs, here with each request's own ``max_new_tokens`` so the mixed workload runs
too), greedy, EOS disabled, per-token timestamps (``record_timestamps``). Offline only: every request
is added at once, after the manager's set-up and CUDA-graph warm-up, which are reported apart
(``setup_s``). The same seed gives the same token ids and lengths as ``serving.py``. Random weights in
bfloat16 on the GPU (float32 on CPU, where a tiny preset and --num_blocks keep it small). Run it in its
own process, after ``serving.py`` has exited (JAX holds most of the GPU's memory), then
``serving.py --merge`` for one table and plot.

    python3 benchmarks/hf_serving.py --model=glm-4-9b-0414 --num_requests=256 --input_len=1000 --output_len=1000 \\
        --json=hf_serving.json
    .venv/bin/python benchmarks/hf_serving.py --model=tiny-llama --num_requests=4 --input_len=16 --output_len=8 \\
        --num_blocks=4 --max_batch_tokens=64
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import transformers
from _serving_gpu import UtilizationSampler
from _serving_metrics import timing_from_token_times
from _serving_report import markdown_table, write_results
from _serving_workload import ServingWorkload, named_workloads
from absl import app, flags
from hf_decode import hf_config  # also defines --model (a preset)

from autoglm_jax.config import ModelConfig
from autoglm_jax.tools.serving_benchmark import summarize

FLAGS = flags.FLAGS
flags.declare_key_flag("model")
flags.DEFINE_integer("num_requests", 256, "Requests (all submitted at once).")
flags.DEFINE_integer("input_len", 1000, "Prompt tokens per request (mean, for the mixed workload).")
flags.DEFINE_integer("output_len", 1000, "Output tokens per request (mean, for the mixed workload); EOS disabled.")
flags.DEFINE_list("workloads", ["fixed"], "fixed and/or mixed, as in serving.py.")
flags.DEFINE_float("range_ratio", 0.9, "Spread r of the mixed workload's lengths, as in serving.py.")
flags.DEFINE_integer("seed", 0, "Workload seed (same requests as serving.py with the same seed).")
flags.DEFINE_integer("num_blocks", None, "ContinuousBatchingConfig.num_blocks (KV blocks; default: from free memory).")
flags.DEFINE_integer("max_batch_tokens", None, "ContinuousBatchingConfig.max_batch_tokens (default: automatic).")
flags.DEFINE_integer("max_requests_per_batch", None, "ContinuousBatchingConfig.max_requests_per_batch (default: "
                     "automatic).")
flags.DEFINE_string("json", None, "Write the results (serving.py's format) to this file.")

MODE = "continuous batching (generate_batch)"


def build_model(preset: str, device: str):
    """The preset's transformers model with random weights, made directly in the run dtype on ``device``."""
    config = ModelConfig.from_preset(preset)
    hf = hf_config(config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of 9 B parameters on the way
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(transformers, config.architecture)(hf).eval()
    finally:
        torch.set_default_dtype(previous)
    return config, model


def run_continuous_batching(model, requests: list[tuple[list[int], int]], cb_config, sample_gpu: bool) -> dict:
    """All ``requests`` ([(prompt ids, output tokens)]) through one continuous-batching manager; the metrics."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    generation_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in requests),
                                                      eos_token_id=-1, pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in requests),
                          max_generated_length=max(n for _, n in requests), num_requests=len(requests))
    setup_start = time.perf_counter()
    manager_context = model.continuous_batching_context_manager(
        generation_config=generation_config, block=True, timeout=5, continuous_batching_config=cb_config,
        workload_hints=hints)
    with manager_context as manager:
        setup_s = time.perf_counter() - setup_start
        with UtilizationSampler(enabled=sample_gpu) as gpu:
            ids = [manager.add_request(prompt, max_new_tokens=n, record_timestamps=True) for prompt, n in requests]
            results = {}
            while len(results) < len(ids):
                result = manager.get_result(timeout=1)
                if result is None and not manager.is_running():
                    raise RuntimeError(f"the continuous-batching loop stopped after {len(results)} of {len(ids)} "
                                       "requests")
                if result is not None and result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                    results[result.request_id] = result
        attention = model.config._attn_implementation
    timings = [timing_from_token_times(results[i].created_time, results[i].timestamps) for i in ids]
    short = [i for i, (t, (_, n)) in enumerate(zip(timings, requests)) if t.tokens != n]
    if short:
        raise RuntimeError(f"{len(short)} requests produced other than their output length (request {short[0]}: "
                           f"{timings[short[0]].tokens} of {requests[short[0]][1]} tokens)")
    return {**summarize(timings), "input_tokens": sum(len(p) for p, _ in requests), **gpu.summary(),
            "setup_s": setup_s, "attn_implementation": attention}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        workloads = named_workloads(FLAGS.workloads, FLAGS.num_requests, FLAGS.input_len, FLAGS.output_len,
                                    FLAGS.range_ratio, FLAGS.seed)
    except ValueError as error:
        raise app.UsageError(str(error))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cb_fields = {"num_blocks": FLAGS.num_blocks, "max_batch_tokens": FLAGS.max_batch_tokens,
                 "max_requests_per_batch": FLAGS.max_requests_per_batch}
    cb_fields = {k: v for k, v in cb_fields.items() if v is not None}
    meta = {"engine": "transformers", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "settings": {"model": FLAGS.model, **cb_fields}, "argv": sys.argv[1:], "skipped": []}
    print(f"transformers {transformers.__version__}, torch {torch.__version__} on {meta['device']}; {meta['settings']}",
          flush=True)
    build_start = time.perf_counter()
    config, model = build_model(FLAGS.model, device)
    build_s = time.perf_counter() - build_start
    # first-call costs (cuBLAS handles, allocator) outside the timed runs
    run_continuous_batching(model, ServingWorkload(2, min(16, FLAGS.input_len), 4).requests(config.vocab_size),
                            transformers.ContinuousBatchingConfig(**cb_fields), sample_gpu=False)
    rows = []
    for workload in workloads:
        metrics = run_continuous_batching(model, workload.requests(config.vocab_size),
                                          transformers.ContinuousBatchingConfig(**cb_fields), device == "cuda")
        rows.append({"engine": "transformers", "mode": MODE, "workload": workload.label, "request_rate": None,
                     **metrics, "model_build_s": build_s, "workload_spec": dataclasses.asdict(workload)})
        print(f"{workload.label}: {metrics['output_tokens_per_s']:,.0f} output tok/s over "
              f"{metrics['duration_s']:.1f} s "
              f"(set-up {metrics['setup_s']:.1f} s, attention {metrics['attn_implementation']})", flush=True)
        if FLAGS.json:
            write_results(FLAGS.json, meta, rows)
    print("\n" + markdown_table(rows))


if __name__ == "__main__":
    app.run(main)
