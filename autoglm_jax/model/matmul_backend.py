"""The engine arg ``matmul_backend`` as a transform over weights: "pallas" wraps the model's projections.

Owns: ``PallasWeight`` (a float weight whose ``linear`` runs ``pallas_kernels.matmul``),
``PallasChannelWeight`` (a weight-only int8 / fp8 ``quant.ChannelWeight`` stored out-feature major for
``pallas_kernels.quantized_matmul``), their ``linear`` rules, and ``apply_matmul_backend``, which swaps
them in for the decoder layers' qkv / o / gate_up / down weights and an untied lm_head of a built
model. Layers never branch on the backend: ``model.layers.linear`` dispatches on the weight's type. It
does not own the kernels or quantizing weights (``autoglm_jax.quant``); W8A8, int4 and GGUF-block
weights keep their XLA rules.

Every leaf of a wrapper carries the weight's leading axes (e.g. the stacked layer axis L), so slicing
the leaves - ``lax.scan`` over stacked layers, or ``DecoderLayers.unstack`` splitting each leaf into
per-layer buffers - gives the wrapper of one layer's weight. Shapes come from the leaves at trace time,
never from metadata.

A rule runs its kernel only when the target is a GPU (the default backend, or the abstract H100 that
``pallas_kernels._interpret.gpu_interpret`` installs on CPU), the activations are bfloat16, the weight
is one layer's 2-D matrix and the kernel's ``supports`` takes (M, K, N, output dtype); otherwise it is
exactly the XLA rule, so no shape ever fails. Numerics match the XLA rule up to summation order: float32
accumulation, and where a bias follows or float32 is asked for (lm_head's logits) the kernel returns its
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
from autoglm_jax.quant.channel import ChannelWeight

MATMUL_BACKENDS = ("xla", "pallas")
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the decoder layers' linear weights [L, K, N]
LM_HEAD = ("lm_head",)  # [H, V], present when not tied to the embeddings


class _WholeWeight:
    def __getitem__(self, index):  # ``nnx.Param(weight)[...]`` returns the weight itself
        if index is Ellipsis:
            return self
        raise TypeError(f"{type(self).__name__} supports only [...] indexing, got {index!r}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PallasWeight(_WholeWeight):
    """weight [..., K, N] float, multiplied by ``pallas_kernels.matmul`` where it fits."""

    weight: jax.Array

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
            and bf16_matmul.supports(m, k, n, x.dtype, kernel_dtype)):
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


def wrap_weight(weight):
    """The Pallas form of one weight: float array -> PallasWeight, weight-only ChannelWeight ->
    PallasChannelWeight; anything else (W8A8, int4, GGUF blocks, already wrapped) unchanged."""
    if isinstance(weight, jax.Array) and jnp.issubdtype(weight.dtype, jnp.floating):
        return PallasWeight(weight)
    if isinstance(weight, ChannelWeight) and weight.activations is None:
        return PallasChannelWeight(jnp.swapaxes(weight.values, -1, -2), weight.scales)
    return weight


def _is_weight(node) -> bool:
    return isinstance(node, (jax.Array, ChannelWeight, PallasWeight, PallasChannelWeight))


def check_matmul_backend(backend: str) -> None:
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"matmul_backend={backend!r}; choose one of {MATMUL_BACKENDS}")


def apply_matmul_backend(model: nnx.Module, backend: str) -> int:
    """Swaps the decoder projections (and an untied lm_head) of ``model`` in place for ``backend``'s
    weight types; returns how many Params changed ("xla": none). A Param may hold one stacked weight or a
    tuple of per-layer ones. Each old weight is dropped as its wrapped form is stored (a weight-only
    int8 / fp8 weight is transposed to [..., N, K] first: one such weight extra at the peak)."""
    check_matmul_backend(backend)
    if backend == "xla":
        return 0
    changed = 0
    for path, node in list(nnx.iter_graph(model)):
        is_projection = path[:1] == ("layers",) and set(path) & set(PROJECTIONS)
        if not (isinstance(node, nnx.Param) and (is_projection or tuple(path) == LM_HEAD)):
            continue
        node.set_value(jax.tree.map(wrap_weight, node.get_value(), is_leaf=_is_weight))
        changed += 1
    if not changed:
        raise ValueError(f"matmul_backend={backend!r}: the model has no decoder projections {PROJECTIONS} to wrap")
    return changed
