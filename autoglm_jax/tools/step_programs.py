"""Lower and compile the runner's two jitted serving steps for a model and engine settings, without weights.

Owns: building a ``ModelRunner`` over an abstract model (parameters and KV pools are shape-only, so a
9B preset analyses on a laptop) and lowering its own jitted ``mixed_step`` / ``decode_loop`` — the
exact programs serving runs, same static arguments and donation — for one bucket of the ladder.
It does not own counting or costing what comes out (``tools.hlo_stats``, ``tools.cost``).

    programs = StepPrograms(ModelConfig.from_preset("tiny-llama"), EngineConfig(...))
    prefill = programs.prefill(token_bucket=64)   # StepProgram: lowered + compiled mixed step
    decode = programs.decode(batch=8)             # one call of the multi-step decode loop
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import resolve_dtype
from autoglm_jax.engine.device_state import DeviceState
from autoglm_jax.engine.memory import plan_num_pages
from autoglm_jax.engine.runner import ModelRunner
from autoglm_jax.model.attention import resolve_attention_backend
from autoglm_jax.model.kv_cache import resolve_kv_cache_dtype


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """One compiled step. ``num_tokens``: flat tokens it processes (T for prefill, B for one decode
    step); ``num_rows``: sequences (B); ``context``: padded context a token may attend to (MP * page)."""

    name: str
    num_tokens: int
    num_rows: int
    context: int
    lowered: jax.stages.Lowered
    compiled: jax.stages.Compiled


class StepPrograms:
    """The runner of ``engine_config`` over ``model_config`` with shape-only parameters and KV pools."""

    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig):
        from autoglm_jax.checkpoint.loader import abstract_model

        self.model_config = model_config
        self.engine_config = cfg = engine_config
        self.dtype = resolve_dtype(cfg.dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, self.dtype)
        self.attention_backend = resolve_attention_backend(cfg.attention_backend, model_config, self.dtype,
                                                           cfg.page_size, self.kv_cache_dtype)
        max_len = cfg.resolved_max_sequence_length(model_config.max_position_embeddings)
        sched = cfg.scheduler_config(max_len)
        self.num_pages = cfg.num_pages or plan_num_pages(
            model_config, page_size=cfg.page_size, cache_dtype=self.kv_cache_dtype,
            max_batch_size=cfg.max_batch_size, max_sequence_length=max_len,
            max_num_batched_tokens=sched.max_num_batched_tokens, memory_fraction=cfg.memory_fraction)
        model = abstract_model(model_config, self.dtype, self.attention_backend)
        # A 2-page pool is allocated by the constructor, then swapped for the real pool's shapes.
        self.runner = ModelRunner(
            model, model_config, max_batch_size=cfg.max_batch_size,
            max_num_batched_tokens=sched.max_num_batched_tokens, max_sequence_length=max_len,
            page_size=cfg.page_size, num_pages=2, cache_dtype=self.kv_cache_dtype,
            decode_steps_per_call=cfg.decode_steps_per_call, max_logprobs=cfg.max_logprobs)
        self.runner.num_pages = self.num_pages
        self.runner.state = jax.eval_shape(functools.partial(
            DeviceState.create, model_config, self.num_pages, cfg.page_size, cfg.max_batch_size,
            self.kv_cache_dtype))

    @property
    def ladder(self):
        return self.runner.ladder

    @property
    def context(self) -> int:
        return self.runner.max_pages_per_sequence * self.runner.page_size

    def prefill(self, token_bucket: int | None = None) -> StepProgram:
        """The mixed step at ``token_bucket`` flat tokens (default: the ladder's largest)."""
        runner = self.runner
        tokens = token_bucket or runner.ladder.token_buckets[-1]
        if tokens not in runner.ladder.token_buckets:
            raise ValueError(f"token_bucket={tokens} is not on the ladder {runner.ladder.token_buckets}")
        lowered = runner.lower_step("mixed", runner._empty_step_input(tokens))
        return StepProgram("prefill", tokens, runner.ladder.rows_for_tokens(tokens), self.context,
                           lowered, lowered.compile())

    def decode(self, batch: int | None = None) -> StepProgram:
        """One call of the decode loop at ``batch`` rows (default: the ladder's largest)."""
        runner = self.runner
        rows = batch or runner.ladder.decode_batches[-1]
        if rows not in runner.ladder.decode_batches:
            raise ValueError(f"batch={rows} is not on the ladder {runner.ladder.decode_batches}")
        lowered = runner.lower_step("decode", runner._empty_decode_input(rows))
        return StepProgram("decode", rows, rows, self.context, lowered, lowered.compile())
