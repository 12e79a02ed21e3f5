"""``autoglm serve``: the OpenAI-compatible HTTP server (FastAPI on uvicorn) over ``AutoGLMEngine``.

Owns: the flags of this command and the process lifecycle: start the engine (compiles its bucket
ladder), serve until SIGTERM / SIGINT, then shut down gracefully (uvicorn stops accepting, waits up to
``--shutdown_timeout`` s for running requests to finish, cancels - and so aborts - the rest), stop the
engine and exit 0. The routes live in ``autoglm_jax.server``.

    autoglm serve --port 8000 --served_model_name smollm2 --max_batch_size 32
"""

from __future__ import annotations

import logging
import os
import signal

from absl import app, flags

from autoglm_jax.engine.config import EngineConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Preset name, Hugging Face directory, .gguf file or Orbax checkpoint "
                    "(default: the embedded SmolLM2-135M-Instruct).")
flags.DEFINE_string("tokenizer", None, "Tokenizer folder or file, if not the model's own.")
flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
flags.DEFINE_integer("port", 8000, "Port to bind.")
flags.DEFINE_string("served_model_name", None, "Model name clients send and /v1/models lists "
                    "(default: the model's file or folder name).")
flags.DEFINE_string("api_key", os.environ.get("AUTOGLM_API_KEY"), "When set, /v1/* requires "
                    "'Authorization: Bearer <key>' (default: $AUTOGLM_API_KEY).")
flags.DEFINE_string("config", None, "JSON or YAML file of EngineConfig settings (e.g. autotune's "
                    "best_config.json); engine flags given explicitly on the command line override it.")
flags.DEFINE_integer("max_n", 16, "Most choices (n) one request may ask for.")
flags.DEFINE_float("shutdown_timeout", 30.0, "Seconds running requests get to finish after SIGTERM/SIGINT.")
flags.DEFINE_enum("log_level", "info", ["critical", "error", "warning", "info", "debug"], "uvicorn log level.")
# engine settings (see EngineConfig)
flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"], "Weights/compute dtype.")
flags.DEFINE_integer("seed", 0, "Engine seed (for requests without one).")
flags.DEFINE_integer("max_batch_size", 32, "Sequences decoding together.")
flags.DEFINE_integer("max_sequence_length", None, "Prompt + output tokens of one sequence "
                     "(default: min(model limit, 4096)).")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget of one engine step.")
flags.DEFINE_float("prefill_ratio", 0.8, "Share of a step's token budget prefill may take while decoding.")
flags.DEFINE_integer("decode_steps_per_call", 8, "Decode steps per jitted call when no prefill is waiting.")
flags.DEFINE_bool("async_scheduling", None, "Dispatch the next decode step before reading the current one's "
                  "tokens (host work overlaps the device; same outputs). Default: on.")
flags.DEFINE_integer("page_size", EngineConfig.page_size, "Tokens per KV page.")
flags.DEFINE_integer("num_pages", None, "KV pool size in pages (default: sized from memory).")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8", "fp8_e4m3"], "KV cache dtype: auto (the model's) "
                  "or fp8 (= fp8_e4m3: float8 e4m3fn pages, no scales; twice a bf16 pool's pages).")
flags.DEFINE_float("memory_fraction", 0.85, "Share of free device memory the KV pool may take.")
flags.DEFINE_integer("max_waiting_requests", 4096, "Requests in flight before the server answers 429.")
flags.DEFINE_integer("max_logprobs", 20, "Most top logprobs a request may ask for.")
flags.DEFINE_enum("attention_backend", "auto", ["auto", "xla", "pallas"], "Attention implementation.")
flags.DEFINE_enum("matmul_backend", "auto", ["auto", "xla", "pallas"], "Decoder projections: auto (on GPU the "
                  "Pallas kernels for int8 / fp8 / int4 weights, and for bf16 ones where this card's tuning table "
                  "measured them faster than XLA; else XLA), XLA dots, or the Pallas "
                  "matmul kernels (bf16 / int8 / fp8 weights on GPU; XLA where a shape does not fit).")
flags.DEFINE_enum("xla_gemm_backend", "auto", ["auto", "triton", "cublas"], "Emitter of XLA's GEMMs per step "
                  "program: auto (Triton below 64 matmul rows, cuBLAS from 64), triton (XLA's default) or cublas.")
flags.DEFINE_float("gil_switch_interval_ms", None, "Python's GIL switch interval while serving (process-wide); "
                   "default 0.5 ms on GPU so the runner's launch thread starts each step program promptly.")
flags.DEFINE_enum("python_gc", "auto", ["auto", "tuned", "default"], "Python's garbage collector while serving "
                  "(process-wide): tuned = the start-up heap frozen and collections rarer; auto = tuned on GPU.")
flags.DEFINE_integer("tensor_parallel_size", 1, "Devices one model replica is split over.")
flags.DEFINE_integer("data_parallel_size", 1, "Engine replicas behind one load-balancing front.")
flags.DEFINE_enum("data_parallel_backend", "auto", ["auto", "process", "thread"], "Data-parallel replicas as one "
                  "OS process each, or threads in this process (auto: process on GPU, thread on CPU).")
flags.DEFINE_string("compilation_cache_dir", EngineConfig.compilation_cache_dir,
                    "Persistent XLA compilation cache ('' = none).")

_ENGINE_FLAGS = ("model", "tokenizer", "dtype", "seed", "max_batch_size", "max_sequence_length",
                 "max_num_batched_tokens", "prefill_ratio", "decode_steps_per_call", "page_size", "num_pages",
                 "kv_cache_dtype", "async_scheduling", "memory_fraction", "max_waiting_requests", "max_logprobs",
                 "attention_backend", "matmul_backend", "xla_gemm_backend", "gil_switch_interval_ms", "python_gc",
                 "tensor_parallel_size", "data_parallel_size", "data_parallel_backend")


def engine_settings() -> dict:
    """EngineConfig fields from --config and the flags (see ``cli.engine_settings``); an empty
    --compilation_cache_dir disables the cache."""
    from autoglm_jax.cli.engine_settings import settings_from_flags

    settings = settings_from_flags(FLAGS, _ENGINE_FLAGS + ("compilation_cache_dir",), FLAGS.config)
    if "compilation_cache_dir" in settings:
        settings["compilation_cache_dir"] = settings["compilation_cache_dir"] or None
    return settings


log = logging.getLogger("autoglm.serve")


def default_served_model_name(model: str | None) -> str:
    """``SmolLM2-135M-Instruct`` for the embedded model, else the file or folder name without .gguf."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def _note_late_signal(signum, frame) -> None:
    """uvicorn re-raises the signal that stopped it once it is done; we are shutting down anyway."""
    log.info("received %s during shutdown", signal.Signals(signum).name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn

    from autoglm_jax.engine.async_engine import AutoGLMEngine
    from autoglm_jax.server import ServerConfig, create_app

    logging.basicConfig(level=FLAGS.log_level.upper())
    server_config = ServerConfig(served_model_name=FLAGS.served_model_name or default_served_model_name(FLAGS.model),
                                 api_key=FLAGS.api_key or None, max_n=FLAGS.max_n)
    engine = AutoGLMEngine(engine_settings()).start()
    server = uvicorn.Server(uvicorn.Config(
        create_app(engine, server_config), host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level,
        timeout_graceful_shutdown=FLAGS.shutdown_timeout, lifespan="off"))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _note_late_signal)
    try:
        server.run()
    finally:
        engine.stop(drain=False, timeout=FLAGS.shutdown_timeout)
    log.info("server stopped")


if __name__ == "__main__":
    app.run(main)
