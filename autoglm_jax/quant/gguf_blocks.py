"""llama.cpp's Q8_0 / Q4_0 / Q4_1 weights kept in their native block layout (32 weights per block).

Owns: ``GGUFBlockWeight`` (the pytree the model holds in place of a float [.., K, N] weight), quantizing
a float weight into it (optionally with learned per-block clipping factors), converting to and from the
GGUF byte layout of a tensor, its dequantization and its ``linear`` rule. Does not own reading GGUF files
(``checkpoint.gguf_file``) or choosing which weights to quantize (``quant.transform``).

GGUF stores a linear weight as rows = output features (N), each row a run of blocks along K. We keep
exactly that: blocks stay blocks, rows stay output-feature major (B = K / 32 blocks per row):
    qs [..., N, B, 32] int8        (q8_0: w = d * q)
    qs [..., N, B, 16] uint8       (q4_0: w = d * (q - 8); q4_1: w = d * q + m), byte j of a block =
                                   code of element j (low nibble) | code of element j + 16 (high nibble)
    d  [..., N, B]     float16     the block scale
    m  [..., N, B]     float16     the block minimum (q4_1 only; a [..., N, 0] empty array otherwise)
``to_gguf_bytes`` / ``from_gguf_bytes`` map this to and from GGUF's interleaved bytes losslessly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from autoglm_jax.model.layers import linear
from autoglm_jax.quant.ste import round_ste

BLOCK = 32
KINDS = ("q8_0", "q4_0", "q4_1")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qs", "d", "m"], meta_fields=["kind"])
@dataclasses.dataclass(frozen=True)
class GGUFBlockWeight:
    qs: jax.Array
    d: jax.Array
    m: jax.Array
    kind: str = "q8_0"

    def __getitem__(self, index):  # ``nnx.Param(weight)[...]`` returns the weight itself
        if index is Ellipsis:
            return self
        raise TypeError(f"GGUFBlockWeight supports only [...] indexing, got {index!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape [..., K, N]."""
        *lead, n, blocks, _ = self.qs.shape
        return (*lead, blocks * BLOCK, n)

    def dequantize_rows(self, dtype=jnp.float32) -> jax.Array:
        """Output-feature major [..., N, K] in dtype (GGUF's own orientation)."""
        d = self.d.astype(jnp.float32)[..., None]
        if self.kind == "q8_0":
            w = self.qs.astype(jnp.float32) * d
        else:
            codes = jnp.concatenate([self.qs & 0xF, self.qs >> 4], axis=-1).astype(jnp.float32)
            w = (codes - 8.0) * d if self.kind == "q4_0" else codes * d + self.m.astype(jnp.float32)[..., None]
        return w.reshape(*w.shape[:-2], -1).astype(dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., K, N] in dtype."""
        return jnp.swapaxes(self.dequantize_rows(dtype), -1, -2)

    def arrays(self) -> dict:
        return {"qs": self.qs, "d": self.d, "m": self.m}


def _blocks(w: jax.Array) -> jax.Array:
    """[..., K, N] -> [..., N, K/32, 32] float32."""
    if w.ndim < 2 or w.shape[-2] % BLOCK:
        raise ValueError(f"GGUF block weights need [..., K, N] with K a multiple of {BLOCK}, got shape {tuple(w.shape)}")
    rows = jnp.swapaxes(w.astype(jnp.float32), -1, -2)
    return rows.reshape(*rows.shape[:-1], rows.shape[-1] // BLOCK, BLOCK)


# kind -> (code range, code offset z): w = (code - z) * d + m, with m = 0 except for q4_1
_CODES = {"q8_0": ((-127, 127), 0.0), "q4_0": ((0, 15), 8.0), "q4_1": ((0, 15), 0.0)}


def grid(w: jax.Array, kind: str, clip: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(d [..., N, B], m [..., N, B]) of float w [..., K, N], rounded to float16 as stored (m = 0 but
    for q4_1); clip [..., N, B] shrinks each block's range; differentiable in clip."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    b = _blocks(w)
    f16 = lambda v: v + jax.lax.stop_gradient(v.astype(jnp.float16).astype(jnp.float32) - v)  # noqa: E731
    if kind == "q4_1":
        hi, lo = jnp.max(b, axis=-1), jnp.min(b, axis=-1)
        if clip is not None:
            mid = 0.5 * (hi + lo)
            hi, lo = mid + (hi - mid) * clip, mid + (lo - mid) * clip
        return f16(jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)), f16(lo)
    if kind == "q8_0":
        amax = jnp.max(jnp.abs(b), axis=-1) * (1.0 if clip is None else clip)
        d = f16(jnp.where(amax > 0, amax / 127.0, 1.0))
    else:  # q4_0, as ggml: d = (the element of largest magnitude, with its sign) / -8
        idx = jnp.argmax(jnp.abs(b), axis=-1)
        extreme = jnp.take_along_axis(b, idx[..., None], axis=-1)[..., 0] * (1.0 if clip is None else clip)
        d = f16(jnp.where(extreme != 0, extreme / -8.0, 1.0))
    return d, jnp.zeros_like(d)


def expand(grid_arrays: tuple, k: int) -> tuple[jax.Array, jax.Array]:
    """The grid per element: (d [..., K, N], m [..., K, N])."""
    return tuple(jnp.broadcast_to(jnp.swapaxes(a, -1, -2)[..., None, :], (*a.shape[:-2], k // BLOCK, BLOCK, a.shape[-2]))
                 .reshape(*a.shape[:-2], k, a.shape[-2]) for a in grid_arrays)


def encode(w: jax.Array, expanded: tuple, kind: str) -> jax.Array:
    """Float codes (code range of ``kind``) of w [..., K, N] (or any rows of it); straight-through."""
    (lo, hi), z = _CODES[kind]
    d, m = expanded
    return jnp.clip(round_ste((w.astype(jnp.float32) - m) / d) + z, lo, hi)


def decode(codes: jax.Array, expanded: tuple, kind: str) -> jax.Array:
    d, m = expanded
    return (codes - _CODES[kind][1]) * d + m


def quantize_gguf(w: jax.Array, kind: str = "q8_0", clip: jax.Array | None = None,
                  grid_arrays: tuple | None = None) -> GGUFBlockWeight:
    """Float w [..., K, N] -> GGUFBlockWeight. clip [..., N, K/32] in (0, ~1] shrinks each block's range;
    ``grid_arrays`` (from ``grid``) fixes d and m instead."""
    grid_arrays = grid(w, kind, clip) if grid_arrays is None else grid_arrays
    codes = _blocks(encode(w, expand(grid_arrays, w.shape[-2]), kind))  # [..., N, B, 32]
    if kind == "q8_0":
        qs = codes.astype(jnp.int8)
    else:
        c = codes.astype(jnp.uint8)
        qs = c[..., :16] | (c[..., 16:] << 4)
    d, m = grid_arrays
    m = m if kind == "q4_1" else jnp.zeros((*d.shape[:-1], 0), jnp.float16)
    return GGUFBlockWeight(qs, d.astype(jnp.float16), m.astype(jnp.float16), kind)


# ---- GGUF bytes ----------------------------------------------------------------------------------

_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def from_gguf_bytes(raw: np.ndarray, kind: str) -> GGUFBlockWeight:
    """One GGUF tensor's bytes uint8 [N, B * block_bytes] -> GGUFBlockWeight of a [K = 32 B, N] weight."""
    raw = np.ascontiguousarray(raw, np.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BLOCK_BYTES[kind])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "q8_0":
        return GGUFBlockWeight(jnp.asarray(blocks[..., 2:].view(np.int8)), jnp.asarray(d),
                               jnp.zeros((n, 0), jnp.float16), kind)
    if kind == "q4_0":
        return GGUFBlockWeight(jnp.asarray(blocks[..., 2:]), jnp.asarray(d), jnp.zeros((n, 0), jnp.float16), kind)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    return GGUFBlockWeight(jnp.asarray(blocks[..., 4:]), jnp.asarray(d), jnp.asarray(m), kind)


def to_gguf_bytes(weight: GGUFBlockWeight) -> np.ndarray:
    """A 2-D GGUFBlockWeight (no leading axes) -> GGUF tensor bytes uint8 [N, B * block_bytes]."""
    if weight.qs.ndim != 3:
        raise ValueError(f"to_gguf_bytes takes one [K, N] weight, got qs of shape {tuple(weight.qs.shape)}")
    parts = [np.asarray(weight.d, np.float16)[..., None].view(np.uint8)]
    if weight.kind == "q4_1":
        parts.append(np.asarray(weight.m, np.float16)[..., None].view(np.uint8))
    parts.append(np.asarray(weight.qs).view(np.uint8))
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(blocks.shape[0], -1)


@linear.register
def _linear_gguf(weight: GGUFBlockWeight, x: jax.Array, bias: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """x [..., K] @ weight [K, N] (+ bias [N]) -> [..., N]; contracts K against the [N, K] block rows."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    rows = weight.dequantize_rows(x.dtype)
    y = jax.lax.dot_general(x, rows, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)
