"""Subprocess worker for the parallel tests: JAX must see 8 (or per-process 2) CPU devices, which
XLA_FLAGS sets only before JAX starts — so the tests run this file with ``python -m`` and read the
JSON it writes: ``{"TPxDP" or "multihost": [[token ids of prompt 0], ...]}``.

    python -m tests.parallel.worker local MODEL OUT.json 1x1 2x1 4x1 8x1 1x2 2x2 2x1u
    (a trailing "u": layers unrolled over per-layer weight buffers, engine arg scan_layers=False)
    python -m tests.parallel.worker multihost MODEL OUT.json PORT PROCESS_ID NUM_PROCESSES
"""

from __future__ import annotations

import json
import os
import sys

PROMPT_LENGTHS = (5, 23, 11, 40, 3)
MAX_TOKENS = (12, 6, 17, 9, 14)
MAX_LEN = 96
ENGINE_ARGS = dict(skip_tokenizer_init=True, compilation_cache_dir=None, max_batch_size=4,
                   max_num_batched_tokens=16, decode_steps_per_call=4, max_logprobs=2, show_progress=False,
                   warmup=False, dtype="float32")


def prompts_and_params(vocab_size: int):
    import numpy as np

    from autoglm_jax.sampling_params import SamplingParams

    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(3, vocab_size, n).tolist()} for n in PROMPT_LENGTHS]
    return prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


def run_local(model: str, specs: list[str]) -> dict:
    from autoglm_jax.llm import LLM

    results = {}
    for spec in specs:  # "TPxDP" + "u" (layers unrolled) and / or "f" (an fp8 KV cache)
        shape = spec.rstrip("uf")
        tp, dp = map(int, shape.split("x"))
        llm = LLM(model, max_model_len=MAX_LEN, tensor_parallel_size=tp, data_parallel_size=dp,
                  scan_layers="u" not in spec[len(shape):], kv_cache_dtype="fp8" if "f" in spec[len(shape):] else "auto",
                  **ENGINE_ARGS)
        prompts, params = prompts_and_params(llm.engine.model_config.vocab_size)
        results[spec] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return results


def run_multihost(model: str, port: str, process_id: str, num_processes: str) -> dict:
    from autoglm_jax.parallel.distributed import DistributedConfig, initialize

    initialize(DistributedConfig(f"127.0.0.1:{port}", int(num_processes), int(process_id)))
    from autoglm_jax.engine.core import EngineCore
    from autoglm_jax.llm import LLM
    from autoglm_jax.parallel import multihost

    core = EngineCore(model=model, mesh=multihost.global_tp_mesh(), max_sequence_length=MAX_LEN, **ENGINE_ARGS)
    if int(process_id) != 0:
        return {"follower_steps": multihost.follow(core)}
    llm = LLM.from_engine(multihost.lead(core))
    prompts, params = prompts_and_params(core.model_config.vocab_size)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    multihost.stop()
    return {"multihost": tokens, "devices": len(core.mesh.devices.flat)}


def main(argv: list[str]) -> None:
    mode, model, out = argv[:3]
    devices = 8 if mode == "local" else 2
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    result = run_local(model, argv[3:]) if mode == "local" else run_multihost(model, *argv[3:])
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
