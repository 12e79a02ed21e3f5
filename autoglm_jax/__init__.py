"""autoglm-jax: a JAX/XLA inference engine for GLM-4 and Llama-family models on NVIDIA GPUs.

Public face: ``LLM`` (offline, vLLM names), ``SamplingParams``, ``RequestOutput`` /
``CompletionOutput``, ``AutoGLMEngine`` (background serving loop), ``ModelConfig``, ``EngineConfig``.
"""

from autoglm_jax.config import ModelConfig
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.outputs import CompletionOutput, Logprob, RequestOutput
from autoglm_jax.sampling_params import SamplingParams


def __getattr__(name):  # heavy imports (JAX model, tokenizer) only when used
    if name == "LLM":
        from autoglm_jax.llm import LLM

        return LLM
    if name == "AutoGLMEngine":
        from autoglm_jax.engine.async_engine import AutoGLMEngine

        return AutoGLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "AutoGLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "ModelConfig", "EngineConfig"]
