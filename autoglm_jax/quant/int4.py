"""Group-wise asymmetric 4-bit weights, two codes packed per byte.

Owns: ``Int4Weight`` (the pytree the model holds in place of a float [.., K, N] weight), quantizing a
float weight into it (round-to-nearest, optionally with learned per-group clipping factors), its
dequantization and its ``linear`` rule. Does not own choosing which weights to quantize
(``quant.transform``) or learning the clipping factors (``quant.calibration``).

Layout (G = ceil(K / group_size) groups along the contraction axis K; ``...`` e.g. the layer axis L):
    packed [..., K, N/2] uint8  low nibble = code of column 2j, high nibble = code of column 2j+1
    scales [..., G, N]   float32
    zeros  [..., G, N]   uint8 in [0, 15] (integer zero point)
    in_scales [..., K]   float32 or None: per-input-channel multipliers of x (activation-aware scaling,
                         ``quant.awq``); the codes then hold w[k, n] / in_scales[k]
    w[k, n] ~= in_scales[k] * (code[k, n] - zeros[k // g, n]) * scales[k // g, n]

With ``in_scales`` the rule computes (x * in_scales) @ dequant(codes): input channels that carry large
activations get their weight rows scaled up before rounding (finer relative grid where it matters), and
the inverse scale moves onto the activation, an elementwise multiply of x inside this rule.

Packing along N (not K) keeps every K group whole whatever K is (SmolLM2's K = 576 is not a multiple
of 2 x 128), and the rule never interleaves weights: it multiplies x by the even and the odd columns
separately and interleaves the two [.., N/2] results, which are activations, not weights.
A last group shorter than group_size (K % group_size != 0) is allowed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from autoglm_jax.model.layers import linear
from autoglm_jax.quant.ste import round_ste

GROUP_SIZES = (32, 64, 128, 256)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "scales", "zeros", "in_scales"],
                   meta_fields=["group_size"])
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array
    group_size: int = 128
    in_scales: jax.Array | None = None

    def __getitem__(self, index):  # ``nnx.Param(weight)[...]`` returns the weight itself
        if index is Ellipsis:
            return self
        raise TypeError(f"Int4Weight supports only [...] indexing, got {index!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape [..., K, N]."""
        return (*self.packed.shape[:-1], 2 * self.packed.shape[-1])

    def codes(self) -> tuple[jax.Array, jax.Array]:
        """(even-column codes, odd-column codes), each uint8 [..., K, N/2]."""
        return self.packed & 0xF, self.packed >> 4

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., K, N] in dtype (the in_scales folded back into the rows)."""
        even, odd = (_dequant_half(c, self, parity, jnp.float32) for parity, c in enumerate(self.codes()))
        w = jnp.stack([even, odd], axis=-1).reshape(self.shape)
        if self.in_scales is not None:
            w = w * self.in_scales[..., :, None]
        return w.astype(dtype)

    def arrays(self) -> dict:
        arrays = {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}
        if self.in_scales is not None:
            arrays["in_scales"] = self.in_scales
        return arrays


def _per_row(group_values: jax.Array, group_size: int, k: int) -> jax.Array:
    """[..., G, C] -> [..., K, C]: each group's value repeated over its rows."""
    *lead, groups, c = group_values.shape
    rows = jnp.broadcast_to(group_values[..., None, :], (*lead, groups, group_size, c))  # no gather to fold
    return rows.reshape(*lead, groups * group_size, c)[..., :k, :]


def _dequant_half(codes, weight: Int4Weight, parity: int, dtype):
    k = codes.shape[-2]
    scales = _per_row(weight.scales[..., parity::2], weight.group_size, k)
    zeros = _per_row(weight.zeros[..., parity::2], weight.group_size, k)
    return ((codes.astype(jnp.float32) - zeros.astype(jnp.float32)) * scales).astype(dtype)


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
    """[..., K, N] -> [..., G, group_size, N], the last group padded by repeating its final row
    (padding never widens a group's range)."""
    k = w.shape[-2]
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:
        w = jnp.concatenate([w, jnp.repeat(w[..., -1:, :], pad, axis=-2)], axis=-2)
    return w.reshape(*w.shape[:-2], groups, group_size, w.shape[-1])


def grid(w: jax.Array, group_size: int, clip: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(scales [..., G, N], zeros [..., G, N] float in [0, 15]) of float w [..., K, N]: each group's
    [min, max] (widened to hold 0) shrunk by clip [..., G, N]; differentiable in clip."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size}; choose one of {GROUP_SIZES}")
    if w.ndim < 2 or w.shape[-1] % 2:
        raise ValueError(f"int4 weight must be [..., K, N] with N even, got shape {tuple(w.shape)}")
    g = _grouped(w.astype(jnp.float32), group_size)
    hi = jnp.maximum(jnp.max(g, axis=-2), 0.0)
    lo = jnp.minimum(jnp.min(g, axis=-2), 0.0)
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    scales = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    return scales, jnp.clip(jnp.round(-lo / scales), 0, 15)


def expand(grid_arrays: tuple, k: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """The grid per element: (scales [..., K, N], zeros [..., K, N])."""
    return tuple(_per_row(a, group_size, k) for a in grid_arrays)


def encode(w: jax.Array, expanded: tuple) -> jax.Array:
    """Float codes in [0, 15] of w [..., K, N] (or any rows of it); straight-through in the scales."""
    scales, zeros = expanded
    return jnp.clip(round_ste(w.astype(jnp.float32) / scales) + zeros, 0, 15)


def decode(codes: jax.Array, expanded: tuple) -> jax.Array:
    scales, zeros = expanded
    return (codes - zeros) * scales


def quantize_int4(w: jax.Array, group_size: int = 128, clip: jax.Array | None = None,
                  grid_arrays: tuple | None = None) -> Int4Weight:
    """Float w [..., K, N] -> Int4Weight. clip [..., G, N] in (0, ~1] shrinks each group's range;
    ``grid_arrays`` (from ``grid``) fixes the scales and zeros instead."""
    grid_arrays = grid(w, group_size, clip) if grid_arrays is None else grid_arrays
    codes = encode(w, expand(grid_arrays, w.shape[-2], group_size)).astype(jnp.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales, zeros = grid_arrays
    return Int4Weight(packed, scales, zeros.astype(jnp.uint8), group_size)


def group_count(k: int, group_size: int) -> int:
    return -(-k // group_size)


@linear.register
def _linear_int4(weight: Int4Weight, x: jax.Array, bias: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """x [..., K] @ weight [K, N] (+ bias [N]) -> [..., N] in out_dtype (default x.dtype)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    if weight.in_scales is not None:
        x = (x.astype(jnp.float32) * weight.in_scales).astype(x.dtype)
    halves = [jnp.dot(x, _dequant_half(c, weight, parity, x.dtype), preferred_element_type=jnp.float32,
                      precision=precision) for parity, c in enumerate(weight.codes())]
    y = jnp.stack(halves, axis=-1).reshape(*x.shape[:-1], -1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)
