"""``LLM``: offline batched generation with vLLM's names (``generate``, ``chat``).

Owns: turning a list of prompts into engine requests, driving ``EngineCore.step`` until all are
done (with a tqdm bar), and returning RequestOutputs in input order. All scheduling is the engine's.
"""

from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.outputs import RequestOutput
from autoglm_jax.sampling_params import SamplingParams


class LLM:
    """``LLM(model=None, dtype="auto", tokenizer=None, skip_tokenizer_init=False, max_model_len=None,
    seed=0, **engine_args)``. ``model``: preset name, HF directory, .gguf file or Orbax checkpoint;
    None = the embedded SmolLM2-135M-Instruct. ``engine_args``: any ``EngineConfig`` field."""

    def __init__(self, model: str | None = None, dtype: str = "auto", tokenizer: str | None = None,
                 skip_tokenizer_init: bool = False, max_model_len: int | None = None, seed: int = 0, **engine_args):
        config = EngineConfig.from_dict(engine_args, model=model, dtype=dtype, tokenizer=tokenizer,
                                        skip_tokenizer_init=skip_tokenizer_init, max_sequence_length=max_model_len,
                                        seed=seed)
        if config.data_parallel_size > 1:  # replicas behind a load balancer (autoglm_jax.parallel.replicas)
            from autoglm_jax.parallel.replicas import replicated_engine_core

            self.engine = replicated_engine_core(config)  # per config.data_parallel_backend
        else:
            self.engine = EngineCore(config)

    @classmethod
    def from_engine(cls, engine: EngineCore) -> "LLM":
        """Wraps an already built engine core (e.g. a stopped ``AutoGLMEngine``'s ``.core``), skipping
        a second model load and compile. The core is not thread-safe: nothing else may step it meanwhile."""
        if not isinstance(engine, EngineCore):
            raise TypeError(f"engine must be an EngineCore, got {type(engine).__name__}")
        llm = cls.__new__(cls)
        llm.engine = engine
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a {"prompt_token_ids": [...]} dict, or a list of them."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        request_ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_ids.append(self.engine.add_request(prompt, p).request_id)
        except Exception:
            for request_id in request_ids:  # a bad prompt queues nothing of this call
                self.engine.abort(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **(chat_template_kwargs or {}))
                   for conversation in conversations]
        return self.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params, use_tqdm)

    @staticmethod
    def _params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts")
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
        bar.close()
        return [final[request_id] for request_id in request_ids]
