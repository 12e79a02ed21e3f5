"""Quantization as a transform over loaded weights: rules from parameter paths to schemes.

Owns: ``QuantRules`` (which parameter gets which scheme; by default every linear projection of the
decoder layers, never the embeddings or lm_head), applying them to a parameter tree
(``quantize_params``) or to a built ``CausalLM`` in place (``quantize_model``), and the storable form
of a quantized tree for Orbax (``to_storable`` / ``from_storable``: plain nested dicts of arrays plus a
JSON manifest ``{path: scheme}``, so a saved checkpoint restores without recomputing scales).

Paths are the model's parameter paths joined by "/": ``layers/qkv``, ``layers/o``, ``layers/gate_up``,
``layers/down`` ([L, K, N] stacked weights), ``embed_tokens``, ``lm_head``, ``norm``, ...
Does not own the schemes' numerics (``quant.schemes``) or calibration (``quant.calibration``: clipping,
GPTQ, AWQ input scales; the transform places its quantized weights where the rules say).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from autoglm_jax.quant.channel import ChannelWeight
from autoglm_jax.quant.gguf_blocks import GGUFBlockWeight
from autoglm_jax.quant.int4 import Int4Weight
from autoglm_jax.tree_paths import flatten, unflatten
from autoglm_jax.quant.schemes import QuantScheme, get_scheme

QUANTIZED_TYPES = (ChannelWeight, Int4Weight, GGUFBlockWeight)
LINEAR_LAYERS = r"layers/(qkv|o|gate_up|down)"


def is_quantized(x) -> bool:
    return isinstance(x, QUANTIZED_TYPES)


@dataclasses.dataclass(frozen=True)
class QuantRules:
    """Ordered (regex, scheme name | None) pairs; a path takes the first rule whose regex fully
    matches it; None (or no match) leaves it in float."""

    rules: tuple[tuple[str, str | None], ...]

    def __post_init__(self):
        for pattern, scheme in self.rules:
            re.compile(pattern)
            if scheme is not None:
                get_scheme(scheme)  # raises on an unknown name

    @classmethod
    def linear_layers(cls, scheme: str) -> "QuantRules":
        """Every decoder linear projection in ``scheme``; embeddings, norms and lm_head stay float."""
        return cls(((LINEAR_LAYERS, scheme),))

    def scheme_for(self, path: str) -> QuantScheme | None:
        for pattern, scheme in self.rules:
            if re.fullmatch(pattern, path):
                return None if scheme is None else get_scheme(scheme)
        return None


def as_rules(quantization: str | QuantRules) -> QuantRules:
    return quantization if isinstance(quantization, QuantRules) else QuantRules.linear_layers(quantization)


@functools.partial(jax.jit, static_argnums=0)
def _quantize(scheme: QuantScheme, w):
    return scheme.quantize(w)


def _quantized(path: str, scheme: QuantScheme, value, calibrated: dict | None):
    """The quantized weight for ``path``: calibration's (checked against the rule) or round-to-nearest."""
    if is_quantized(value):
        raise ValueError(f"parameter {path!r} is quantized already ({type(value).__name__})")
    if calibrated is None or path not in calibrated:
        return _quantize(scheme, jnp.asarray(value))
    weight = calibrated[path]
    if not is_quantized(weight) or scheme_name(weight) != scheme.name or weight.shape != tuple(value.shape):
        raise ValueError(f"calibrated weight for {path!r} is not a {scheme.name} weight of shape {tuple(value.shape)}")
    return weight


def quantize_params(params: dict, quantization: str | QuantRules, calibrated: dict | None = None) -> tuple[dict, dict]:
    """(tree with quantized weights at the ruled paths, manifest {path: scheme name}).

    ``params``: nested dict of float arrays (host or device), consumed leaf by leaf. ``calibrated``:
    optional {path: quantized weight} from ``quant.calibration`` used instead of round-to-nearest.
    Raises ValueError when the rules match no parameter, or a weight is quantized already.
    """
    rules = as_rules(quantization)
    flat, manifest = flatten(params), {}
    for path, value in flat.items():
        scheme = rules.scheme_for(path)
        if scheme is None:
            continue
        flat[path] = _quantized(path, scheme, value, calibrated)
        manifest[path] = scheme.name
    if not manifest:
        raise ValueError(f"quantization rules {rules.rules} match no parameter (have {sorted(flat)})")
    return unflatten(flat), manifest


def quantize_model(model: nnx.Module, quantization: str | QuantRules, calibrated: dict | None = None) -> dict:
    """Replaces the ruled float Params of ``model`` by quantized ones in place (``calibrated``: as in
    ``quantize_params``); returns the manifest.
    The model drops each float weight as soon as its quantized form exists, so when it held the only
    reference the peak is one weight extra (arrays shared with another holder are never deleted)."""
    rules = as_rules(quantization)
    manifest = {}
    for path in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        scheme = rules.scheme_for(path)
        if scheme is None:
            continue
        *parents, name = path.split("/")
        owner = functools.reduce(getattr, parents, model)
        setattr(owner, name, nnx.Param(_quantized(path, scheme, getattr(owner, name)[...], calibrated)))
        manifest[path] = scheme.name
    if not manifest:
        raise ValueError(f"quantization rules {rules.rules} match no parameter of the model")
    return manifest


def model_manifest(model: nnx.Module) -> dict:
    """{path: scheme name} of the quantized weights a model holds (empty for a float model)."""
    return {path: scheme_name(v) for path, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
            if is_quantized(v)}


def scheme_name(weight) -> str:
    """The scheme a quantized weight was made with."""
    if isinstance(weight, ChannelWeight):
        storage = "int8" if weight.values.dtype == jnp.int8 else "fp8"
        return storage if weight.activations is None else f"w8a8-{weight.activations}"
    if isinstance(weight, Int4Weight):
        return f"int4-g{weight.group_size}"
    if isinstance(weight, GGUFBlockWeight):
        return weight.kind
    raise TypeError(f"{type(weight).__name__} is not a quantized weight")


# ---- storable form (Orbax) -----------------------------------------------------------------------


def to_storable(params: dict) -> tuple[dict, dict]:
    """(nested dict of plain arrays, manifest {path: scheme}): each quantized weight becomes a dict
    of its arrays (e.g. ``layers/qkv/values``, ``layers/qkv/scales``)."""
    flat, manifest = flatten(params), {}
    for path, value in list(flat.items()):
        if is_quantized(value):
            manifest[path] = scheme_name(value)
            flat[path] = dict(value.arrays())
    return unflatten(flat), manifest


def from_storable(tree: dict, manifest: dict | None, dtype=None) -> dict:
    """Inverse of ``to_storable``: rebuilds the quantized weights named in ``manifest``; casts every
    other floating-point array to ``dtype`` (None = keep), never the quantized weights' own arrays."""
    manifest = manifest or {}
    out = {}

    def walk(node: dict, prefix: str, dst: dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in manifest:
                if not isinstance(value, dict):
                    raise ValueError(f"manifest says {path!r} is {manifest[path]}, but the tree holds a plain array there")
                dst[key] = get_scheme(manifest[path]).from_arrays(value)
            elif isinstance(value, dict):
                walk(value, path + "/", dst.setdefault(key, {}))
            elif dtype is not None and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != jnp.dtype(dtype):
                dst[key] = jnp.asarray(value).astype(dtype)
            else:
                dst[key] = value

    walk(tree, "", out)
    missing = sorted(set(manifest) - set(flatten(out)))
    if missing:
        raise ValueError(f"manifest names weights {missing} that the tree lacks")
    return out


def apply_quantization(model: nnx.Module, quantization: str | QuantRules) -> dict:
    """``quantize_model`` for a freshly loaded model: a model already quantized (from a quantized
    checkpoint) is accepted when every quantized weight has the requested scheme, else ValueError."""
    existing = model_manifest(model)
    if not existing:
        return quantize_model(model, quantization)
    rules = as_rules(quantization)
    wanted = {path: (scheme.name if (scheme := rules.scheme_for(path)) else None) for path in existing}
    if any(wanted[path] != name for path, name in existing.items()):
        raise ValueError(f"the checkpoint is quantized already ({existing}); it cannot be re-quantized as "
                         f"{quantization!r} (drop --quantization or convert from the float model)")
    return existing
