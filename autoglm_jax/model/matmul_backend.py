"""The engine arg ``matmul_backend`` as a transform over weights: "pallas" wraps the model's projections,
"auto" (the default) only on a GPU its int8 / fp8 / int4 ones (weight-only and W8A8) and its bf16 ones at the
shapes where this card's tuning table measured the kernel faster than XLA, "xla" on a GPU only its W8A8 ones,
into their [N, K] layout with no kernel.

Owns: ``PallasWeight`` (a float weight whose ``linear`` runs ``pallas_kernels.matmul``),
``PallasChannelWeight`` (a weight-only int8 / fp8 ``quant.ChannelWeight`` stored out-feature major for
``pallas_kernels.quantized_matmul``), ``PallasW8A8Weight`` (a W8A8 ChannelWeight stored out-feature major
for ``pallas_kernels.w8a8_matmul`` at decode sizes and XLA's 8-bit GEMM otherwise), ``PallasInt4Weight`` (a
group-wise ``quant.int4.Int4Weight`` in ``pallas_kernels.int4_matmul``'s layout), their ``linear`` rules,
and ``apply_matmul_backend``, which swaps them in for the decoder layers' qkv / o / gate_up / down weights
and an untied lm_head of a built model. Layers never branch on the backend: ``model.layers.linear``
dispatches on the weight's type. It does not own the kernels or quantizing weights (``autoglm_jax.quant``;
the checkpoint keeps W8A8 weights [K, N]); GGUF-block weights, and int4 ones whose groups the kernel does
not take (group size not 64 / 128, or not dividing K), keep their XLA rules.

W8A8 on a GPU is wrapped by every backend: XLA compiles its 8-bit dot to cuBLASLt, which wants the weight
K-major and otherwise transposes the whole weight on every call (benchmarks/w8a8_gemm.py: 10x slower at
GLM-4's gate_up), so the [N, K] layout is made once at load time; "xla" then keeps only the XLA rule.

Every leaf of a wrapper carries the weight's leading axes (e.g. the stacked layer axis L), so slicing
the leaves - ``lax.scan`` over stacked layers, or ``DecoderLayers.unstack`` splitting each leaf into
per-layer buffers - gives the wrapper of one layer's weight. Shapes come from the leaves at trace time,
never from metadata.

A rule runs its kernel only when the target is a GPU (the default backend, or the abstract H100 that
``pallas_kernels._interpret.gpu_interpret`` installs on CPU), the activations are bfloat16 (W8A8: any
float, quantized per token first), the weight is one layer's 2-D matrix and the kernel's ``supports`` takes
(M, K, N, output dtype); otherwise it is exactly the XLA rule, so no shape ever fails. Numerics match the
XLA rule up to summation order: float32 accumulation, and where a bias follows or float32 is asked for (lm_head's logits) the kernel returns its
float32 sums, rounded once after the bias. The kernels return float32 only for M <= 128 (decode), so
a biased projection (GLM's qkv) or lm_head over more rows runs in XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from autoglm_jax.model.layers import linear
from autoglm_jax.quant.channel import ChannelWeight, quantize_activations, w8a8_product
from autoglm_jax.quant.int4 import Int4Weight

MATMUL_BACKENDS = ("auto", "xla", "pallas")
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the decoder layers' linear weights [L, K, N]
LM_HEAD = ("lm_head",)  # [H, V], present when not tied to the embeddings


class _WholeWeight:
    def __getitem__(self, index):  # ``nnx.Param(weight)[...]`` returns the weight itself
        if index is Ellipsis:
            return self
        raise TypeError(f"{type(self).__name__} supports only [...] indexing, got {index!r}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"], meta_fields=["where_faster"])
@dataclasses.dataclass(frozen=True)
class PallasWeight(_WholeWeight):
    """weight [..., K, N] float, multiplied by ``pallas_kernels.matmul`` where it fits. ``where_faster`` (the
    "auto" backend): only at the (M, K, N) whose tuning-table entry for this card was measured faster than
    XLA (``pallas_kernels.tuning.beats_xla``), XLA's dot elsewhere."""

    weight: jax.Array
    where_faster: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values_t", "scales"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PallasChannelWeight(_WholeWeight):
    """A weight-only ChannelWeight in the kernel's layout:
    values_t [..., N, K] int8 | float8_e4m3fn (out-feature major), scales [..., N] float32."""

    values_t: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape [..., K, N]."""
        *lead, n, k = self.values_t.shape
        return (*lead, k, n)

    def as_channel_weight(self) -> ChannelWeight:
        """The same weight in ``quant.channel``'s [..., K, N] layout (a transpose XLA folds into the dot)."""
        return ChannelWeight(jnp.swapaxes(self.values_t, -1, -2), self.scales)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values_t", "scales"],
                   meta_fields=["activations", "use_kernel"])
@dataclasses.dataclass(frozen=True)
class PallasW8A8Weight(_WholeWeight):
    """A W8A8 ChannelWeight stored out-feature major: values_t [..., N, K] float8_e4m3fn | int8, scales
    [..., N] float32, activations "fp8" | "int8" (the per-token activation type, as in the ChannelWeight).
    ``use_kernel``: decode sizes run ``pallas_kernels.w8a8_matmul`` ("auto" / "pallas"); False ("xla")
    keeps XLA's 8-bit GEMM on the [N, K] layout for every size."""

    values_t: jax.Array
    scales: jax.Array
    activations: str = "fp8"
    use_kernel: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape [..., K, N]."""
        *lead, n, k = self.values_t.shape
        return (*lead, k, n)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales", "offsets", "in_scales"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PallasInt4Weight(_WholeWeight):
    """An Int4Weight in the kernel's layout (``pallas_kernels.int4_matmul``), made once at wrap time:
    codes [..., G, N, g] int4 = code - 8 (group-major), scales [..., G, N] float32, offsets [..., G, N]
    float32 = scale * (8 - zero) (the zero point folded out: w = scale * codes + offset per group),
    in_scales [..., K] float32 or None (multiplies x first, as in the Int4Weight rule)."""

    codes: jax.Array
    scales: jax.Array
    offsets: jax.Array
    in_scales: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape [..., K, N]."""
        *lead, groups, n, group_size = self.codes.shape
        return (*lead, groups * group_size, n)

    def as_int4_weight(self) -> Int4Weight:
        """The same weight as ``quant.int4``'s Int4Weight (packed along N), for its XLA rule."""
        return _int4_weight(self)


@jax.jit
def _kernel_int4_layout(weight: Int4Weight) -> PallasInt4Weight:
    even, odd = weight.codes()  # [..., K, N/2] uint8 in [0, 15]
    *lead, k, n = weight.shape
    g = weight.group_size
    codes = (jnp.stack([even, odd], axis=-1).astype(jnp.int8) - 8).reshape(*lead, k // g, g, n)  # int4 last:
    offsets = weight.scales * (8.0 - weight.zeros.astype(jnp.float32))  # the shuffles stay on bytes
    return PallasInt4Weight(jnp.swapaxes(codes, -1, -2).astype(jnp.int4), weight.scales, offsets, weight.in_scales)


@jax.jit
def _int4_weight(weight: PallasInt4Weight) -> Int4Weight:
    *lead, k, n = weight.shape
    codes = (jnp.swapaxes(weight.codes.astype(jnp.int8), -1, -2) + 8).astype(jnp.uint8).reshape(*lead, k, n)
    zeros = jnp.round(8.0 - weight.offsets / weight.scales).astype(jnp.uint8)
    return Int4Weight(codes[..., 0::2] | (codes[..., 1::2] << 4), weight.scales, zeros, weight.codes.shape[-1],
                      weight.in_scales)


def targets_gpu() -> bool:
    """Whether kernels traced now target a GPU: an abstract GPU device (the CPU interpreter) or the default backend."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return (abstract.platform if abstract is not None else jax.default_backend()) == "gpu"


def _kernel_dtypes(x: jax.Array, bias: jax.Array | None, out_dtype):
    """(dtype the kernel returns, dtype linear returns): with a bias the kernel returns its float32 sums,
    so the bias is added before the one rounding, as in the XLA rule."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    return (jnp.dtype(jnp.float32) if bias is not None else out_dtype), out_dtype


def _finish(y: jax.Array, bias: jax.Array | None, out_dtype) -> jax.Array:
    """y [..., N] from a kernel + bias [N] in float32, in out_dtype."""
    return y.astype(out_dtype) if bias is None else (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out_dtype)


@linear.register
def _linear_pallas(weight: PallasWeight, x: jax.Array, bias: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """x [..., K] @ weight [K, N] (+ bias [N]) -> [..., N]: the Pallas kernel on x as [M, K], else XLA."""
    from pallas_kernels import matmul as bf16_matmul

    w = weight.weight
    k, n = w.shape[-2:]
    m = x.size // k if k else 0
    kernel_dtype, out_dtype = _kernel_dtypes(x, bias, out_dtype)
    if not (w.ndim == 2 and w.dtype == x.dtype and targets_gpu()
            and bf16_matmul.supports(m, k, n, x.dtype, kernel_dtype)
            and (not weight.where_faster or bf16_matmul.beats_xla(m, k, n, x.dtype))):
        return linear(w, x, bias, out_dtype)
    y = bf16_matmul.matmul(x.reshape(m, k), w, out_dtype=kernel_dtype)
    return _finish(y.reshape(*x.shape[:-1], n), bias, out_dtype)


@linear.register
def _linear_pallas_channel(weight: PallasChannelWeight, x: jax.Array, bias: jax.Array | None = None,
                           out_dtype=None) -> jax.Array:
    """x [..., K] @ dequant(weight) [K, N] (+ bias [N]) -> [..., N]: the int8/fp8 kernel, else the XLA rule."""
    from pallas_kernels import quantized_matmul as qmm

    values_t = weight.values_t
    n, k = values_t.shape[-2:]
    m = x.size // k if k else 0
    kernel_dtype, out_dtype = _kernel_dtypes(x, bias, out_dtype)
    if not (values_t.ndim == 2 and targets_gpu() and qmm.supports(m, k, n, x.dtype, values_t.dtype, kernel_dtype)):
        return linear(weight.as_channel_weight(), x, bias, out_dtype)
    y = qmm.quantized_matmul(x.reshape(m, k), values_t, weight.scales, out_dtype=kernel_dtype)
    return _finish(y.reshape(*x.shape[:-1], n), bias, out_dtype)


@linear.register
def _linear_w8a8(weight: PallasW8A8Weight, x: jax.Array, bias: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """x [..., K] quantized per token @ weight [N, K]^T (+ bias [N]) -> [..., N]: the W8A8 kernel at decode
    sizes (M <= 128) on a GPU, else the W8A8 rule as XLA's GEMM on the [N, K] layout (``w8a8_product``)."""
    from pallas_kernels import matmul as bf16_matmul
    from pallas_kernels import w8a8_matmul as w8mm

    values_t = weight.values_t
    n, k = values_t.shape[-2:]
    m = x.size // k if k else 0
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if not (weight.use_kernel and values_t.ndim == 2 and m <= bf16_matmul.SMALL_M_MAX and targets_gpu()
            and w8mm.supports(m, k, n, values_t.dtype, jnp.float32)):
        y = w8a8_product(x, values_t, weight.scales, weight.activations, weights_nk=True)
        return _finish(y, bias, out_dtype)
    x_q, x_scales = quantize_activations(x.reshape(m, k), weight.activations)  # [M, K] 8-bit, [M, 1] f32
    y = w8mm.w8a8_matmul(x_q, x_scales[:, 0], values_t, weight.scales, out_dtype=jnp.float32)
    return _finish(y.reshape(*x.shape[:-1], n), bias, out_dtype)


@linear.register
def _linear_pallas_int4(weight: PallasInt4Weight, x: jax.Array, bias: jax.Array | None = None,
                        out_dtype=None) -> jax.Array:
    """x [..., K] @ dequant(weight) [K, N] (+ bias [N]) -> [..., N]: the int4 kernel, else the Int4Weight rule."""
    from pallas_kernels import int4_matmul as i4mm

    k, n = weight.shape[-2:]
    group_size = weight.codes.shape[-1]
    m = x.size // k if k else 0
    kernel_dtype, out_dtype = _kernel_dtypes(x, bias, out_dtype)
    if not (weight.codes.ndim == 3 and targets_gpu() and i4mm.supports(m, k, n, x.dtype, group_size, kernel_dtype)):
        return linear(weight.as_int4_weight(), x, bias, out_dtype)
    if weight.in_scales is not None:
        x = (x.astype(jnp.float32) * weight.in_scales).astype(x.dtype)
    y = i4mm.int4_matmul(x.reshape(m, k), weight.codes, weight.scales, weight.offsets, out_dtype=kernel_dtype)
    return _finish(y.reshape(*x.shape[:-1], n), bias, out_dtype)


def wrap_auto(weight):
    """The "auto" backend's form of one weight (on a GPU): ``wrap_weight`` for int8 / fp8 (weight-only and
    W8A8) and int4 weights; a float weight becomes a ``where_faster`` PallasWeight if this card's tuning table
    has a shape of its (K, N) measured faster than XLA (``pallas_kernels.matmul.beats_xla_at``), else stays."""
    from pallas_kernels import matmul as bf16_matmul

    if isinstance(weight, (ChannelWeight, Int4Weight)):
        return wrap_weight(weight)
    if isinstance(weight, jax.Array) and bf16_matmul.beats_xla_at(*weight.shape[-2:], weight.dtype):
        return PallasWeight(weight, where_faster=True)
    return weight


def wrap_w8a8_layout(weight):
    """A W8A8 ChannelWeight -> PallasW8A8Weight with XLA's rule only (the "xla" backend on a GPU); else unchanged."""
    if isinstance(weight, ChannelWeight) and weight.activations is not None:
        return PallasW8A8Weight(jnp.swapaxes(weight.values, -1, -2), weight.scales, weight.activations, use_kernel=False)
    return weight


def wrap_weight(weight):
    """The Pallas form of one weight: float array -> PallasWeight, weight-only ChannelWeight ->
    PallasChannelWeight, W8A8 ChannelWeight -> PallasW8A8Weight, Int4Weight in groups the kernel takes ->
    PallasInt4Weight; anything else (other int4 groups, GGUF blocks, already wrapped) unchanged."""
    from pallas_kernels.int4_matmul import GROUP_SIZES

    if isinstance(weight, jax.Array) and jnp.issubdtype(weight.dtype, jnp.floating):
        return PallasWeight(weight)
    if isinstance(weight, ChannelWeight) and weight.activations is None:
        return PallasChannelWeight(jnp.swapaxes(weight.values, -1, -2), weight.scales)
    if isinstance(weight, ChannelWeight):
        return PallasW8A8Weight(jnp.swapaxes(weight.values, -1, -2), weight.scales, weight.activations)
    if isinstance(weight, Int4Weight) and weight.group_size in GROUP_SIZES and weight.shape[-2] % weight.group_size == 0:
        return _kernel_int4_layout(weight)
    return weight


def _is_weight(node) -> bool:
    return isinstance(node, (jax.Array, ChannelWeight, Int4Weight, PallasWeight, PallasChannelWeight, PallasW8A8Weight,
                             PallasInt4Weight))


def check_matmul_backend(backend: str) -> None:
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"matmul_backend={backend!r}; choose one of {MATMUL_BACKENDS}")


def apply_matmul_backend(model: nnx.Module, backend: str) -> int:
    """Swaps the decoder projections (and an untied lm_head) of ``model`` in place for ``backend``'s
    weight types; returns how many Params changed. A Param may hold one stacked weight or a tuple of
    per-layer ones. Each old weight is dropped as its wrapped form is stored (an int8 / fp8 weight is
    transposed to [..., N, K] first, an int4 one regrouped to [..., G, N, g]: one such weight extra at the
    peak, in bytes for int4).
    "auto": on a GPU (``targets_gpu``) int8 / fp8 (weight-only and W8A8) and int4 weights are wrapped -
    there the int8 / fp8 kernel is 1.3x XLA's dequantize-and-dot at batch-1 decode - and float weights only
    for the kernel at the token counts where this card's tuning table measured it faster than XLA's dot
    (``wrap_auto``: on an H200 the tuned bf16 decode kernel, on an H100 XLA's GEMV; benchmarks/RESULTS.md);
    off a GPU nothing is.
    "xla": on a GPU only W8A8 weights, into their [N, K] layout with XLA's rule (see the module
    docstring); off a GPU nothing is."""
    check_matmul_backend(backend)
    if backend != "pallas" and not targets_gpu():
        return 0
    wrap = {"auto": wrap_auto, "xla": wrap_w8a8_layout, "pallas": wrap_weight}[backend]
    changed = 0
    for path, node in list(nnx.iter_graph(model)):
        is_projection = path[:1] == ("layers",) and set(path) & set(PROJECTIONS)
        if not (isinstance(node, nnx.Param) and (is_projection or tuple(path) == LM_HEAD)):
            continue
        old = node.get_value()
        new = jax.tree.map(wrap, old, is_leaf=_is_weight)
        if backend != "pallas" and jax.tree.structure(old) == jax.tree.structure(new):  # nothing wrapped (a
            continue  # wrapper is always another pytree type; an unwrapped weight comes back as it was)
        node.set_value(new)
        changed += 1
    if not changed and backend == "pallas":
        raise ValueError(f"matmul_backend={backend!r}: the model has no decoder projections {PROJECTIONS} to wrap")
    return changed
