"""One entry point from "what the user named" to a ready model: preset, HF dir, GGUF file or Orbax.

Owns: recognising the kind of checkpoint and turning its parameter tree into a ``CausalLM`` on the
device. Random-weight presets are initialised on the device (no host copy).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.config import PRESETS, ModelConfig
from autoglm_jax.model.decoder import CausalLM
from autoglm_jax.quant.transform import is_quantized


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What ``model=`` named, resolved: kind in {"preset", "hf", "gguf", "orbax"} and the path/name."""

    kind: str
    path: str


def resolve_model_source(model: str | None) -> ModelSource:
    from autoglm_jax.checkpoint.hf import is_hf_directory
    from autoglm_jax.default_model import default_model_path

    if model is None:
        return ModelSource("gguf", default_model_path())
    if model in PRESETS and not os.path.exists(model):
        return ModelSource("preset", model)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return ModelSource("gguf", model)
    if is_hf_directory(model):
        return ModelSource("hf", model)
    if os.path.isdir(model):
        from autoglm_jax.checkpoint.orbax_io import is_orbax_checkpoint

        if is_orbax_checkpoint(model):
            return ModelSource("orbax", model)
        raise CheckpointError(f"{model} is a directory with neither config.json (Hugging Face) nor an Orbax checkpoint")
    raise CheckpointError(
        f"model {model!r} is not a preset ({', '.join(sorted(PRESETS))}), a .gguf file, a Hugging Face "
        f"directory or an Orbax checkpoint"
    )


def _progress(iterable, total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="Loading weights", unit="tensor", disable=not enabled, leave=False)


def model_config_of(model: str | None) -> ModelConfig:
    """The ModelConfig of what ``model=`` names, without reading any weights."""
    source = resolve_model_source(model)
    if source.kind == "preset":
        return ModelConfig.from_preset(source.path)
    if source.kind == "hf":
        return ModelConfig.from_hf_config(source.path)
    if source.kind == "gguf":
        from autoglm_jax.checkpoint.gguf import config_from_gguf

        return config_from_gguf(source.path)
    from autoglm_jax.checkpoint.orbax_io import read_config

    return read_config(source.path)


def load_params(source: ModelSource, dtype, progress: bool = False) -> tuple[ModelConfig, dict | None]:
    """(config, host parameter tree) for a checkpoint; (config, None) for a random preset.
    ``progress`` shows a tqdm bar over the tensors while they stream in."""
    from autoglm_jax.checkpoint.params import assemble_params

    if source.kind == "preset":
        return ModelConfig.from_preset(source.path), None
    if source.kind == "hf":
        from autoglm_jax.checkpoint.hf import iter_hf_tensors

        config = ModelConfig.from_hf_config(source.path)
        return config, assemble_params(config, _progress(iter_hf_tensors(source.path), None, progress), dtype)
    if source.kind == "gguf":
        from autoglm_jax.checkpoint.gguf import config_from_gguf, iter_gguf_tensors
        from autoglm_jax.checkpoint.gguf_file import open_gguf

        config = config_from_gguf(source.path)
        named = ((name, tensor, os.path.basename(source.path)) for name, tensor in iter_gguf_tensors(source.path, config))
        total = len(open_gguf(source.path).tensors)
        return config, assemble_params(config, _progress(named, total, progress), dtype)
    if source.kind == "orbax":
        from autoglm_jax.checkpoint.orbax_io import restore_checkpoint

        from autoglm_jax.quant.transform import from_storable

        # restored in the saved dtypes: quantized weights (int8, fp8, ...) and their scales keep theirs
        config, params, extra = restore_checkpoint(source.path)
        return config, from_storable(params, (extra.get("quantization") or {}).get("weights"), dtype)
    raise ValueError(f"unknown model source kind {source.kind!r}")


def abstract_model(config: ModelConfig, dtype, attention_backend: str = "xla") -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(config, param_dtype=dtype, attention_backend=attention_backend,
                                           rngs=nnx.Rngs(0)))


def build_model(config: ModelConfig, params: dict | None, dtype, attention_backend: str = "xla", seed: int = 0,
                mesh=None) -> CausalLM:
    """A CausalLM on the default device: from a host parameter tree (consumed: each host buffer is
    dropped once on the device), or random weights created on the device when ``params`` is None.
    With a ("tp",) ``mesh`` the weights go straight into their tensor-parallel shards instead."""
    if mesh is not None:
        from autoglm_jax.parallel.placement import build_sharded_model

        return build_sharded_model(config, params, dtype, attention_backend, seed, mesh)
    if params is None:
        return nnx.jit(lambda: CausalLM(config, param_dtype=dtype, attention_backend=attention_backend,
                                        rngs=nnx.Rngs(seed)))()
    graphdef, state = nnx.split(abstract_model(config, dtype, attention_backend))
    on_device = _to_device(params, dtype)
    nnx.replace_by_pure_dict(state, on_device)
    return nnx.merge(graphdef, state)


def _to_device(tree: dict, dtype) -> dict:
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        if isinstance(value, dict):
            out[key] = _to_device(value, dtype)
        elif is_quantized(value):  # a restored quantized weight keeps its own dtypes
            out[key] = jax.device_put(value)
        else:
            out[key] = jax.device_put(jnp.asarray(value, dtype))
    return out


def load_model(model: str | None, dtype=jnp.bfloat16, attention_backend: str = "xla", seed: int = 0,
               progress: bool = False, mesh=None, quantization: str | None = None, matmul_backend: str = "auto"):
    """(config, CausalLM, source) for a preset name, HF directory, GGUF file, Orbax checkpoint or None;
    ``mesh``: see ``build_model``. ``quantization``: a scheme of ``autoglm_jax.quant.SCHEMES`` applied to
    every decoder linear projection after loading (a quantized Orbax checkpoint is already quantized:
    None or its own scheme). ``matmul_backend``: "pallas" then wraps those projections for the Pallas
    matmul kernels (``autoglm_jax.model.matmul_backend``); "auto" the quantized ones (weight-only
    int8 / fp8 / int4, W8A8) and float ones where this card's tuning table measured the kernel faster than
    XLA, on a GPU and without a mesh; "xla" leaves them as they are, except that on a GPU
    W8A8 weights are stored out-feature major for XLA's 8-bit GEMM (no weight transpose per call)."""
    from autoglm_jax.model.matmul_backend import check_matmul_backend

    check_matmul_backend(matmul_backend)
    if quantization is not None and mesh is not None:
        raise ValueError(f"quantization={quantization!r} with tensor parallelism (a mesh) is not supported yet")
    if matmul_backend == "auto" and mesh is not None:
        matmul_backend = "xla"
    if matmul_backend != "xla" and mesh is not None:
        raise ValueError(f"matmul_backend={matmul_backend!r} with tensor parallelism (a mesh) is not supported yet")
    source = resolve_model_source(model)
    config, params = load_params(source, dtype, progress)
    model_ = build_model(config, params, dtype, attention_backend, seed, mesh)
    transform_model(model_, quantization, matmul_backend)
    return config, model_, source


def transform_model(model: CausalLM, quantization: str | None, matmul_backend: str) -> CausalLM:
    """The weight transforms ``load_model`` applies after building, in place and in order: the quantization
    scheme (if any), then the matmul backend's weight wrappers. Also run on an abstract model
    (``nnx.eval_shape``) to know the served weights' shapes before loading them."""
    from autoglm_jax.model.matmul_backend import apply_matmul_backend

    if quantization is not None:
        from autoglm_jax.quant.transform import apply_quantization

        apply_quantization(model, quantization)
    apply_matmul_backend(model, matmul_backend)
    return model
