"""Converting a Hugging Face directory or GGUF file into an Orbax checkpoint (weights + tokenizer).

Owns: choosing the destination, writing the parameters with ``orbax_io.save_checkpoint`` and the
tokenizer files beside them, so ``LLM(model=<output>)`` loads both without the source.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from autoglm_jax.checkpoint.loader import load_params, resolve_model_source
from autoglm_jax.checkpoint.orbax_io import save_checkpoint
from autoglm_jax.tokenizer_loading import load_tokenizer

CHECKPOINTS_DIR = "checkpoints"


def default_output(source_path: str) -> str:
    name = os.path.basename(os.path.normpath(source_path))
    return os.path.join(CHECKPOINTS_DIR, name.removesuffix(".gguf"))


def convert_checkpoint(model: str | None, output: str | None = None, dtype: str = "bfloat16",
                       quantization: str | None = None) -> str:
    """Writes ``model`` (HF dir, .gguf, or None = the default model) as Orbax to ``output``; returns it.
    ``quantization``: a scheme of ``autoglm_jax.quant.SCHEMES`` for every decoder linear projection;
    the quantized arrays and their scales are stored, so loading recomputes nothing."""
    source = resolve_model_source(model)
    if source.kind not in ("hf", "gguf"):
        raise ValueError(f"convert takes a Hugging Face directory or a .gguf file, got {source.kind} {source.path!r}")
    output = output or default_output(source.path)
    config, params = load_params(source, jnp.dtype(dtype))
    extra = {"source": os.path.abspath(source.path), "source_kind": source.kind}
    if quantization is not None:
        from autoglm_jax.quant.transform import quantize_params, to_storable

        params, _ = quantize_params(params, quantization)
        params, manifest = to_storable(params)
        extra["quantization"] = {"scheme": quantization, "weights": manifest}
    save_checkpoint(output, config, params, extra_metadata=extra)
    tokenizer = load_tokenizer(None, source)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output
