"""The named quantization schemes: what ``--quantization=<name>`` means.

Owns: the table of schemes and, for each, how to quantize a float [.., K, N] weight (``quantize``), its
grid (``grid``: the stored scales / zero points, and ``expand``: the same per element), the differentiable
quantize-dequantize used by calibration and GPTQ (``round_trip`` / ``fake_quantize``), the shape of its
learnable clipping factors (``clip_shape``: one factor per scale), and rebuilding a stored weight from
its arrays (``from_arrays``), and the per-scale layout helpers calibration combines candidates with
(``group_sum``, ``per_column``). Does not own the weight types (``channel``, ``int4``, ``gguf_blocks``) or which
parameters get a scheme (``transform``).

    int8        int8 weights, per-output-channel scales           (weight-only)
    fp8         float8_e4m3fn weights, per-output-channel scales  (weight-only)
    w8a8-int8   int8 weights + per-token dynamic int8 activations
    w8a8-fp8    fp8 weights + per-token dynamic fp8 activations
    int4-g64    4-bit asymmetric, groups of 64 along K ("int4" = int4-g128)
    int4-g128   4-bit asymmetric, groups of 128 along K
    q8_0 q4_0 q4_1   llama.cpp blocks of 32 (GGUF layout)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from autoglm_jax.quant import channel, gguf_blocks, int4


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """family in {"channel", "int4", "gguf"}; storage: "int8"/"fp8" (channel) or the GGUF kind;
    activations: None or the W8A8 activation type; group_size: int4 only."""

    name: str
    family: str
    storage: str = ""
    activations: str | None = None
    group_size: int = 0

    def quantize(self, w: jax.Array, clip: jax.Array | None = None, grid: tuple | None = None):
        """Float w [..., K, N] -> the scheme's weight pytree (clip: see ``clip_shape``; grid: fixed
        scales from ``grid``, e.g. those GPTQ rounded against, instead of w's own)."""
        self.check_shape(w.shape)
        if self.family == "channel":
            return channel.quantize_channel(w, self.storage, clip, self.activations, grid)
        if self.family == "int4":
            return int4.quantize_int4(w, self.group_size, clip, grid)
        return gguf_blocks.quantize_gguf(w, self.storage, clip, grid)

    def grid(self, w: jax.Array, clip: jax.Array | None = None) -> tuple:
        """The scales (and zero points / minima) of float w [..., K, N], as the weight stores them;
        differentiable in clip."""
        self.check_shape(w.shape)
        if self.family == "channel":
            return channel.grid(w, self.storage, clip)
        if self.family == "int4":
            return int4.grid(w, self.group_size, clip)
        return gguf_blocks.grid(w, self.storage, clip)

    def expand(self, grid: tuple, k: int) -> tuple:
        """``grid`` per element: arrays broadcastable to [..., K, N]."""
        if self.family == "channel":
            return channel.expand(grid, k)
        if self.family == "int4":
            return int4.expand(grid, k, self.group_size)
        return gguf_blocks.expand(grid, k)

    def round_trip(self, w: jax.Array, expanded: tuple) -> jax.Array:
        """Quantize-dequantize w [..., R, N] (any rows, with those rows of ``expand``'s arrays) in float32,
        straight-through in the grid: the one rounding both storing and calibration use."""
        if self.family == "channel":
            return channel.decode(channel.encode(w, expanded, self.storage), expanded)
        if self.family == "int4":
            return int4.decode(int4.encode(w, expanded), expanded)
        return gguf_blocks.decode(gguf_blocks.encode(w, expanded, self.storage), expanded, self.storage)

    def fake_quantize(self, w: jax.Array, clip: jax.Array | None = None, grid: tuple | None = None) -> jax.Array:
        """w [..., K, N] quantized and dequantized in float32, differentiable in clip."""
        grid = self.grid(w, clip) if grid is None else grid
        return self.round_trip(w, self.expand(grid, w.shape[-2]))

    def clip_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the clipping factors for a float weight of ``shape`` [..., K, N]: one per scale."""
        *lead, k, n = shape
        if self.family == "channel":
            return (*lead, n)
        if self.family == "int4":
            return (*lead, int4.group_count(k, self.group_size), n)
        return (*lead, n, k // gguf_blocks.BLOCK)

    def group_sum(self, values: jax.Array) -> jax.Array:
        """values [..., K, N] (one per weight element) summed over each scale's elements -> ``clip_shape``."""
        *lead, k, n = values.shape
        if self.family == "channel":
            return jnp.sum(values, axis=-2)
        if self.family == "int4":
            groups = int4.group_count(k, self.group_size)
            padded = jnp.pad(values, [(0, 0)] * len(lead) + [(0, groups * self.group_size - k), (0, 0)])
            return jnp.sum(padded.reshape(*lead, groups, self.group_size, n), axis=-2)
        blocks = jnp.sum(values.reshape(*lead, k // gguf_blocks.BLOCK, gguf_blocks.BLOCK, n), axis=-2)
        return jnp.swapaxes(blocks, -1, -2)

    def per_column(self, values: jax.Array) -> jax.Array:
        """values [..., N] (one per output column) -> broadcastable against clipping factors of ``clip_shape``."""
        if self.family == "channel":
            return values
        if self.family == "int4":
            return values[..., None, :]
        return values[..., :, None]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(f"scheme {self.name}: weight must be [..., K, N], got shape {tuple(shape)}")
        if self.family == "int4" and shape[-1] % 2:
            raise ValueError(f"scheme {self.name}: N={shape[-1]} must be even (two codes per byte)")
        if self.family == "gguf" and shape[-2] % gguf_blocks.BLOCK:
            raise ValueError(f"scheme {self.name}: K={shape[-2]} must be a multiple of {gguf_blocks.BLOCK}")

    def from_arrays(self, arrays: dict):
        """The weight pytree from the dict its ``arrays()`` gave (e.g. restored from Orbax)."""
        try:
            if self.family == "channel":
                return channel.ChannelWeight(arrays["values"], arrays["scales"], self.activations)
            if self.family == "int4":
                return int4.Int4Weight(arrays["packed"], arrays["scales"], arrays["zeros"], self.group_size,
                                       arrays.get("in_scales"))
            return gguf_blocks.GGUFBlockWeight(arrays["qs"], arrays["d"], arrays["m"], self.storage)
        except KeyError as e:
            raise ValueError(f"scheme {self.name}: stored weight lacks array {e.args[0]!r} (has {sorted(arrays)})") from e


SCHEMES: dict[str, QuantScheme] = {s.name: s for s in (
    QuantScheme("int8", "channel", "int8"),
    QuantScheme("fp8", "channel", "fp8"),
    QuantScheme("w8a8-int8", "channel", "int8", activations="int8"),
    QuantScheme("w8a8-fp8", "channel", "fp8", activations="fp8"),
    QuantScheme("int4-g64", "int4", group_size=64),
    QuantScheme("int4-g128", "int4", group_size=128),
    QuantScheme("q8_0", "gguf", "q8_0"),
    QuantScheme("q4_0", "gguf", "q4_0"),
    QuantScheme("q4_1", "gguf", "q4_1"),
)}
ALIASES = {"int4": "int4-g128"}


def get_scheme(name: str) -> QuantScheme:
    """The scheme called ``name`` (case-insensitive; aliases: int4 = int4-g128)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join([*SCHEMES, *ALIASES])}")
    return SCHEMES[key]
