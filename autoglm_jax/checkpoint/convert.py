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


def read_calibration_prompts(path: str) -> list[str]:
    """The prompts of a calibration file: one per line, blank lines skipped (UTF-8 text)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"calibration file {path!r} has no prompts (one per line)")
    return prompts


def convert_checkpoint(model: str | None, output: str | None = None, dtype: str = "bfloat16",
                       quantization: str | None = None, calibration_prompts: list[str] | None = None,
                       calibration_token_ids: list[list[int]] | None = None) -> str:
    """Writes ``model`` (HF dir, .gguf, or None = the default model) as Orbax to ``output``; returns it.
    ``quantization``: a scheme of ``autoglm_jax.quant.SCHEMES`` for every decoder linear projection;
    the quantized arrays and their scales are stored, so loading recomputes nothing. With calibration
    text (``calibration_prompts``, tokenized by the source's tokenizer) or token ids, the weights are
    quantized by ``quant.calibration`` (the float model's own activations on them: learned clipping,
    GPTQ, scale refits - never worse than round-to-nearest on them) instead of round-to-nearest, and the
    metadata records the mean layer output error of both."""
    source = resolve_model_source(model)
    if source.kind not in ("hf", "gguf"):
        raise ValueError(f"convert takes a Hugging Face directory or a .gguf file, got {source.kind} {source.path!r}")
    calibrating = calibration_prompts is not None or calibration_token_ids is not None
    if calibrating and quantization is None:
        raise ValueError("calibration data given without quantization: choose a scheme to calibrate")
    output = output or default_output(source.path)
    config, params = load_params(source, jnp.dtype(dtype))
    extra = {"source": os.path.abspath(source.path), "source_kind": source.kind}
    tokenizer = load_tokenizer(None, source)
    if quantization is not None:
        from autoglm_jax.quant.transform import quantize_params, to_storable

        calibrated, calibration = None, None
        if calibrating:
            token_ids = list(calibration_token_ids or [])
            if calibration_prompts is not None:
                if tokenizer is None:
                    raise ValueError(f"{source.path!r} has no tokenizer to encode calibration prompts; pass token ids")
                token_ids += [tokenizer.encode(p) for p in calibration_prompts]
            calibrated, calibration = _calibrate(config, params, token_ids, quantization)
        params, _ = quantize_params(params, quantization, calibrated)
        params, manifest = to_storable(params)
        extra["quantization"] = {"scheme": quantization, "weights": manifest}
        if calibration is not None:
            extra["quantization"]["calibration"] = calibration
    save_checkpoint(output, config, params, extra_metadata=extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output


def _calibrate(config, params: dict, token_ids: list[list[int]], quantization: str) -> tuple[dict, dict]:
    """({path: calibrated weight}, metadata) from the float model built on a copy of ``params``."""
    import jax
    import numpy as np

    from autoglm_jax.checkpoint.loader import build_model
    from autoglm_jax.quant.calibration import calibrate_model

    model = build_model(config, jax.tree.map(np.array, params), jnp.float32)
    calibrated, report = calibrate_model(model, token_ids, quantization)
    rtn = float(np.mean([np.mean(r) for r, _ in report.values()]))
    cal = float(np.mean([np.mean(c) for _, c in report.values()]))
    return calibrated, {"sequences": len(token_ids), "tokens": int(sum(map(len, token_ids))),
                        "mean_layer_error_round_to_nearest": rtn, "mean_layer_error_calibrated": cal}
