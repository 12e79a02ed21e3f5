"""Engine settings: one frozen dataclass, built from keyword args, a dict (the seed's entry point) or flags.

Owns: every knob of the serving engine and its validation. The model's architecture lives in
``autoglm_jax.config.ModelConfig``; scheduling limits are derived here into ``SchedulerConfig``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from autoglm_jax.engine.scheduler_config import SchedulerConfig
from autoglm_jax.engine.xla_options import XLA_GEMM_BACKENDS

DTYPES = ("auto", "bfloat16", "float16", "float32")
PYTHON_GC_MODES = ("auto", "tuned", "default")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Settings of ``LLM`` / ``AutoGLMEngine``.

    model: preset name, Hugging Face directory, .gguf file or Orbax checkpoint; None = the embedded
        SmolLM2-135M-Instruct. dtype: "auto" = bfloat16 on GPU, float32 on CPU.
    max_batch_size: sequences decoding together (and slots of per-sequence sampling state).
    max_sequence_length: prompt + output tokens of one sequence (None = min(model limit, 4096)).
    max_num_batched_tokens: token budget of one step (decodes + prefill chunks).
    prefill_ratio: share of a step's token budget prefill may take while sequences are decoding.
    page_size: tokens per KV page (64: the prefill kernel issues one TMA copy per page, and at 16 those
        copies cost it ~3% against cuDNN at 16k tokens; offline serving is the same at 16 and 64 --
        benchmarks/RESULTS.md, session 17). kv_cache_dtype: the KV pool's dtype, as vLLM's ``--kv-cache-dtype``:
        "auto" = the model's dtype; "fp8" (alias "fp8_e4m3") = float8 e4m3fn pages with no scales (values
        saturated to +-448 when written, converted to the model's dtype when read): half a bf16 pool's
        bytes per page, so twice the pages in the same memory (``model.kv_cache.resolve_kv_cache_dtype``).
        num_pages: KV pool size (None = sized from free device memory
        times memory_fraction, then fitted to the compiled step programs' memory before it is allocated:
        smaller, with a warning, when a program needs more than the plan left it (``engine.memory``);
        on CPU, enough for every slot at max_sequence_length).
    decode_steps_per_call: decode steps run inside one jitted call (lax.while_loop) when every running
        sequence decodes and no waiting request could join the batch (empty queue, no free batch slot
        or KV pages); a slot freed inside such a call is refilled at the next call.
    async_scheduling: dispatch the next decode step before reading the current one's tokens back, so
        the host's scheduling and output processing overlap the device (same outputs; arrivals and
        aborts take effect one step later). None = on (see ``engine.core.resolve_async_scheduling``).
    gil_switch_interval_ms: how long the engine thread may hold Python's GIL while another thread waits for
        it (``sys.setswitchinterval``; process-wide). The runner's launch thread needs the GIL briefly to
        start each step program, while the engine thread runs the host work of the step before: at
        Python's default 5 ms the device waited for that hand-off (H100 offline serving, one machine:
        9,052 tok/s at 0.5 ms vs 8,568 at 5 ms). None = 0.5 ms on GPU, Python's own setting elsewhere.
    python_gc: Python's cyclic garbage collector while serving (process-wide): "tuned" = the heap alive
        once the engine is built is collected and frozen (``gc.freeze``: start-up objects -- JAX, the model's
        graph -- are never scanned again) and the first generation's threshold raised to
        ``engine.core.GC_THRESHOLD0`` allocations, so per-step objects die by reference count before a
        collection starts (at Python's 700 a long-lived-generation collection paused the engine for
        ~0.3 s on this workplace's CPU; vLLM's engine core freezes its start-up heap too); "default" = Python's
        own; "auto" = tuned on GPU, Python's own elsewhere.
    xla_autotune_seed: XLA GEMM autotuning results copied into the compilation cache before the first
        compile (``engine.autotune_seed``): "auto" = the results shipped for this card (if any), a directory =
        those, None = none (XLA autotunes every GEMM fusion the cache lacks).
    xla_gemm_backend: the emitter XLA compiles the step programs' GEMMs with (``engine.xla_options``):
        "triton" (XLA's default, autotuned Triton fusions), "cublas", or "auto" = Triton for programs of
        fewer than 64 matmul rows (batch-1 decode: split-K GEMVs), cuBLAS from 64 rows (faster on the H100).
    executable_cache: save the compiled step programs under compilation_cache_dir/executables and load
        them on the next start without tracing (``engine.executable_cache``). None = on GPU only: XLA:CPU
        cannot run an executable deserialized in a process that compiled the same program itself.
    use_dynamic_batching: False = static batching (the seed's baseline): the requests waiting when nothing
        runs form a batch of up to max_batch_size, which runs to completion before the next forms
        (``SchedulerConfig.use_dynamic_batching``).
    adaptive_batching: wait up to batching_window_max_ms for more requests under light load.
    max_logprobs: most top-logprobs a request may ask for (compiled into the step's output shape).
    max_waiting_requests: bound of the waiting queue (the server answers 429 past it).
    tensor_parallel_size: devices one model replica is split over (heads / MLP columns / vocab, with
        shard_map). data_parallel_size: engine replicas behind one load-balancing front; together they
        need tensor_parallel_size x data_parallel_size devices (``autoglm_jax.parallel``).
    data_parallel_backend: how the replicas run. "process": one OS process per replica, each stepping its
        own devices without waiting for the others (no GIL or lockstep); "thread": all replicas in this
        process, stepped together from threads; "auto" = process on GPU, thread on CPU.
    """

    model: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_batch_size: int = 32
    max_sequence_length: int | None = None
    max_num_batched_tokens: int = 512
    prefill_ratio: float = 0.8
    page_size: int = 64
    kv_cache_dtype: str = "auto"
    num_pages: int | None = None
    memory_fraction: float = 0.85
    decode_steps_per_call: int = 8
    async_scheduling: bool | None = None
    gil_switch_interval_ms: float | None = None
    python_gc: str = "auto"
    executable_cache: bool | None = None
    use_dynamic_batching: bool = True
    adaptive_batching: bool = True
    batching_window_min_ms: float = 0.0
    batching_window_max_ms: float = 5.0
    attention_backend: str = "auto"
    matmul_backend: str = "auto"
    # Run the decoder layers under lax.scan over stacked weights (True), or unrolled over per-layer weight
    # buffers (False: on GPU 2.2x faster batch-1 decode, since a scan slices each layer's weights out of the
    # stack with a copy before its GEMMs; slower to compile). None = False on GPU, True elsewhere.
    scan_layers: bool | None = None
    max_logprobs: int = 20
    max_waiting_requests: int = 4096
    compilation_cache_dir: str | None = os.path.join(os.path.expanduser("~"), ".cache", "autoglm_jax", "xla")
    xla_autotune_seed: str | None = "auto"
    xla_gemm_backend: str = "auto"
    warmup: bool = True
    show_progress: bool = True  # tqdm bar while weights load
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_backend: str = "auto"  # "auto", "process" or "thread" (see above)
    quantization: str | None = None  # a scheme of autoglm_jax.quant.SCHEMES for every decoder linear

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {DTYPES}")
        if self.quantization is not None:
            from autoglm_jax.quant.schemes import get_scheme

            get_scheme(self.quantization)  # ValueError naming the unknown scheme
        if self.kv_cache_dtype != "auto":  # (the default needs no jax import)
            from autoglm_jax.model.kv_cache import resolve_kv_cache_dtype

            resolve_kv_cache_dtype(self.kv_cache_dtype, "float32")  # ValueError naming the choices
        for name in ("max_batch_size", "max_num_batched_tokens", "page_size", "decode_steps_per_call",
                     "max_waiting_requests", "tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.max_sequence_length is not None and (not isinstance(self.max_sequence_length, int) or self.max_sequence_length < 2):
            raise ValueError(f"max_sequence_length={self.max_sequence_length!r} must be an int >= 2")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            raise ValueError(f"num_pages={self.num_pages!r} must be an int >= 2 (page 0 is scratch)")
        if not 0.0 < self.prefill_ratio <= 1.0:
            raise ValueError(f"prefill_ratio={self.prefill_ratio!r} must be in (0, 1]")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction={self.memory_fraction!r} must be in (0, 1]")
        if self.attention_backend not in ("auto", "xla", "pallas"):
            raise ValueError(f"attention_backend={self.attention_backend!r}; choose auto, xla or pallas")
        if self.data_parallel_backend not in ("auto", "process", "thread"):
            raise ValueError(f"data_parallel_backend={self.data_parallel_backend!r}; choose auto, process or thread")
        if self.matmul_backend not in ("auto", "xla", "pallas"):
            raise ValueError(f"matmul_backend={self.matmul_backend!r}; choose auto, xla or pallas")
        if self.xla_gemm_backend not in XLA_GEMM_BACKENDS:
            raise ValueError(f"xla_gemm_backend={self.xla_gemm_backend!r}; choose one of {XLA_GEMM_BACKENDS}")
        if self.executable_cache not in (None, True, False):
            raise ValueError(f"executable_cache={self.executable_cache!r}; choose True, False or None (auto)")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling={self.async_scheduling!r}; choose True, False or None (auto)")
        interval = self.gil_switch_interval_ms
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                     or not interval > 0):
            raise ValueError(f"gil_switch_interval_ms={interval!r} must be None (auto) or a number of milliseconds > 0")
        if self.python_gc not in PYTHON_GC_MODES:
            raise ValueError(f"python_gc={self.python_gc!r}; choose one of {PYTHON_GC_MODES}")
        if self.scan_layers not in (None, True, False):
            raise ValueError(f"scan_layers={self.scan_layers!r}; choose True, False or None (auto)")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs={self.max_logprobs!r} must be an int >= 0")
        if not 0 <= self.batching_window_min_ms <= self.batching_window_max_ms:
            raise ValueError("need 0 <= batching_window_min_ms <= batching_window_max_ms, got "
                             f"{self.batching_window_min_ms} and {self.batching_window_max_ms}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | "EngineConfig" | None = None, **overrides) -> "EngineConfig":
        """From a dict (unknown keys are an error naming them and the accepted ones) or a config."""
        if isinstance(values, EngineConfig):
            return dataclasses.replace(values, **overrides) if overrides else values
        merged = {**(values or {}), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}; accepted: {sorted(known)}")
        return cls(**merged)

    def resolved_max_sequence_length(self, model_limit: int) -> int:
        return self.max_sequence_length or min(model_limit, 4096)

    def scheduler_config(self, max_sequence_length: int) -> SchedulerConfig:
        return SchedulerConfig(
            max_batch_size=self.max_batch_size,
            max_num_batched_tokens=max(self.max_num_batched_tokens, self.max_batch_size),
            page_size=self.page_size,
            max_sequence_length=max_sequence_length,
            prefill_ratio=self.prefill_ratio,
            use_dynamic_batching=self.use_dynamic_batching,
        )
