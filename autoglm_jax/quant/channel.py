"""Per-output-channel 8-bit weights (int8 or fp8 e4m3), optionally with dynamic 8-bit activations (W8A8).

Owns: ``ChannelWeight`` (the pytree the model holds in place of a float [.., K, N] weight), quantizing
a float weight into it (round-to-nearest, optionally with learned per-channel clipping factors), its
dequantization, and its ``linear`` rule. Does not own choosing which weights to quantize
(``quant.transform``) or learning the clipping factors (``quant.calibration``).

Layout (leading axes ``...`` are e.g. the stacked layer axis L; ``lax.scan`` slices every leaf):
    values [..., K, N]  int8 in [-127, 127] or float8_e4m3fn in [-448, 448]
    scales [..., N]     float32, w[k, n] ~= values[k, n] * scales[n]
    activations         None (weight-only) | "int8" | "fp8": x is quantized per token at run time

The weight-only rule computes ``(x @ values) * scales``: the scale is per output column, so applying it
after the float32-accumulated dot is exact, and the narrow weight is what gets read from memory.
W8A8 quantizes each token row of x with its own scale (absmax / qmax) and runs an 8-bit x 8-bit dot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from autoglm_jax.model.layers import linear
from autoglm_jax.quant.ste import cast_ste, round_ste

# storage dtype name -> (jnp dtype, largest representable magnitude we use)
STORAGE = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}
ACTIVATIONS = (None, "int8", "fp8")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"],
                   meta_fields=["activations"])
@dataclasses.dataclass(frozen=True)
class ChannelWeight:
    values: jax.Array
    scales: jax.Array
    activations: str | None = None

    def __getitem__(self, index):  # ``nnx.Param(weight)[...]`` returns the weight itself
        if index is Ellipsis:
            return self
        raise TypeError(f"ChannelWeight supports only [...] indexing, got {index!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape [..., K, N]."""
        return tuple(self.values.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., K, N] in dtype."""
        return (self.values.astype(jnp.float32) * self.scales[..., None, :]).astype(dtype)

    def arrays(self) -> dict:
        return {"values": self.values, "scales": self.scales}


def grid(w: jax.Array, storage: str, clip: jax.Array | None = None) -> tuple[jax.Array]:
    """(scales [..., N],) of float w [..., K, N]: absmax / qmax per column, the absmax shrunk by clip
    [..., N] (None = round-to-nearest on the full range); differentiable in clip."""
    _, qmax = STORAGE[storage]
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-2)
    if clip is not None:
        amax = amax * clip
    return (jnp.where(amax > 0, amax / qmax, 1.0),)


def expand(grid_arrays: tuple, k: int) -> tuple[jax.Array]:
    """The grid per element: (scales [..., 1, N],), broadcastable to [..., K, N]."""
    del k
    return (grid_arrays[0][..., None, :],)


def encode(w: jax.Array, expanded: tuple, storage: str) -> jax.Array:
    """Float codes on the storage grid, w [..., K, N] (or any rows of it) with ``expand``'s params;
    straight-through in the scales."""
    _, qmax = STORAGE[storage]
    scaled = jnp.clip(w.astype(jnp.float32) / expanded[0], -qmax, qmax)
    return round_ste(scaled) if storage == "int8" else cast_ste(scaled, jnp.float8_e4m3fn)


def decode(codes: jax.Array, expanded: tuple) -> jax.Array:
    return codes * expanded[0]


def quantize_channel(w: jax.Array, storage: str = "int8", clip: jax.Array | None = None,
                     activations: str | None = None, grid_arrays: tuple | None = None) -> ChannelWeight:
    """Float w [..., K, N] -> ChannelWeight. clip [..., N] in (0, ~1] shrinks each column's range
    (None = round-to-nearest on the full absmax); ``grid_arrays`` (from ``grid``) fixes the scales instead."""
    if storage not in STORAGE:
        raise ValueError(f"storage={storage!r}; choose one of {tuple(STORAGE)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}; choose one of {ACTIVATIONS}")
    if w.ndim < 2:
        raise ValueError(f"weight must be [..., K, N], got shape {tuple(w.shape)}")
    grid_arrays = grid(w, storage, clip) if grid_arrays is None else grid_arrays
    codes = encode(w, expand(grid_arrays, w.shape[-2]), storage)
    return ChannelWeight(codes.astype(STORAGE[storage][0]), grid_arrays[0], activations)


def quantize_activations(x: jax.Array, storage: str) -> tuple[jax.Array, jax.Array]:
    """Per-token dynamic quantization: x [..., K] -> (codes [..., K] in the storage dtype, scales [..., 1] f32)."""
    dtype, qmax = STORAGE[storage]
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scales = jnp.where(amax > 0, amax / qmax, 1.0)
    scaled = jnp.clip(x32 / scales, -qmax, qmax)
    return (jnp.round(scaled) if storage == "int8" else scaled).astype(dtype), scales


def w8a8_product(x: jax.Array, values: jax.Array, scales: jax.Array, activations: str,
                 weights_nk: bool = False) -> jax.Array:
    """The W8A8 rule without bias: x [..., K] quantized per token (``quantize_activations``), an 8-bit x
    8-bit dot with values [K, N] (int32 accumulation for int8, float32 for fp8), then both scales
    (scales [N]) in float32 -> [..., N] float32. ``weights_nk``: values are stored [N, K] (out-feature major,
    as ``model.matmul_backend`` keeps them on a GPU: the layout XLA's cuBLASLt 8-bit GEMM reads without a
    per-call transpose); the same sums.

    With ``weights_nk`` (the served GPU layout) the weight passes an optimization barrier together with x:
    whatever XLA inserts for the 8-bit dot on the weight alone (XLA:CPU upcasts it to float32) then depends on
    this call's tokens, so it is neither hoisted out of the decode ``while`` loop nor scheduled ahead of the
    layers for every weight at once (without it: a float32 copy of every layer's weights live through the
    step program, +0.76 GiB of temp a GLM-4-9B layer). The [K, N] rule is left as it was: the barrier also
    stops XLA's excess-precision folding of x, which moves its fp8 roundings."""
    if weights_nk:
        x, values = jax.lax.optimization_barrier((x, values))
    xq, x_scales = quantize_activations(x, activations)
    acc = jnp.int32 if activations == "int8" else jnp.float32
    contracted = values.ndim - 1 if weights_nk else values.ndim - 2
    y = jax.lax.dot_general(xq, values, (((x.ndim - 1,), (contracted,)), ((), ())), preferred_element_type=acc)
    return y.astype(jnp.float32) * x_scales * scales


@linear.register
def _linear_channel(weight: ChannelWeight, x: jax.Array, bias: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """x [..., K] @ weight [K, N] (+ bias [N]) -> [..., N] in out_dtype (default x.dtype)."""
    if weight.activations is None:
        precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
        y = jnp.dot(x, weight.values.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)
        y = y * weight.scales
    else:
        y = w8a8_product(x, weight.values, weight.scales, weight.activations)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)
