"""Calibration: quantized weights that minimise each linear layer's output error on the model's own
activations: clipping factors learned with optax, then GPTQ (``quant.gptq``) on the clipped grid.

Owns: collecting the model's own input activations of every quantized linear (``collect_input_stats``:
the Gram matrix X^T X per layer, over a few hundred prompts' hidden states; a prefix all prompts share
counted once), learning one clipping factor per scale and choosing per output column among
round-to-nearest / clipped / GPTQ (``calibrate_weight``), and doing it for a model (``calibrate_params``,
``calibrate_model``). Does not own the schemes (``quant.schemes``), GPTQ's rounding (``quant.gptq``) or
placing the weights (``quant.transform``).

Objective, per layer l with input activations X [T, K] and weight W [K, N]:
    err(clip) = ||X W - X Q(W; clip)||^2 / ||X W||^2 = tr(dW^T G dW) / tr(W^T G W),   G = X^T X
Q is the scheme's quantize-dequantize with straight-through rounding (``quant.ste``), so Adam moves
the clipping factors (initialised at 1 = round-to-nearest). The loss is optimised through a rank-r
factor A of G (A^T A ~= G, the top-r eigen-directions); the errors that choose between candidates are
measured with the full G, per output column: never worse than RTN on the calibration inputs.

Activations are captured without touching the layers: the target weights are wrapped in ``_Tap``
pytrees whose ``linear`` rule sends x to the host (``jax.debug.callback``) and then runs the real rule.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from autoglm_jax.model.attention_metadata import AttentionMetadata
from autoglm_jax.model.kv_cache import KVCache
from autoglm_jax.model.layers import linear
from autoglm_jax.quant.gptq import GPTQConfig, gptq_weight
from autoglm_jax.quant.schemes import QuantScheme, get_scheme
from autoglm_jax.quant.transform import QuantRules, as_rules, is_quantized
from autoglm_jax.tree_paths import flatten

PAGE_SIZE = 16
TOKEN_BUCKET = 32  # prompts are padded to a multiple of this (bounded recompiles)


# ---- activation statistics -----------------------------------------------------------------------


class _GramSink:
    """Host accumulator: path -> float64 [L, K, K] sum of x^T x over valid tokens, and the token count."""

    def __init__(self):
        self.grams: dict[str, np.ndarray] = {}
        self.tokens = 0
        self.start = 0  # rows [start, valid) of the current sequence are counted
        self.valid = 0

    def add(self, path: str, layer, x) -> None:
        x = np.asarray(x, np.float64)[self.start: self.valid]
        layer = int(layer)
        gram = self.grams.get(path)
        if gram is None:
            raise KeyError(f"no accumulator for {path!r}")
        gram[layer] += x.T @ x


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "layer"], meta_fields=["path", "sink"])
@dataclasses.dataclass(frozen=True)
class _Tap:
    """A float weight [.., K, N] plus its layer index [..], reporting its input to ``sink``."""

    weight: jax.Array
    layer: jax.Array
    path: str
    sink: _GramSink

    def __getitem__(self, index):
        return self


@linear.register
def _linear_tap(weight: _Tap, x, bias=None, out_dtype=None):
    jax.debug.callback(functools.partial(weight.sink.add, weight.path), weight.layer, x)
    return linear(weight.weight, x, bias, out_dtype)


def shared_prefix_length(token_seqs) -> int:
    """Length of the prefix all sequences share (e.g. a chat template's system prompt)."""
    first = token_seqs[0] if token_seqs else []
    n = 0
    while n < len(first) and all(len(s) > n and s[n] == first[n] for s in token_seqs):
        n += 1
    return n


def collect_input_stats(model: nnx.Module, token_seqs, rules: QuantRules | str) -> tuple[dict[str, np.ndarray], int]:
    """({path: Gram float64 [L, K, K]} of the inputs of every ruled [L, K, N] weight, tokens counted).

    ``token_seqs``: token-id lists, each run as one prefill from position 0. A prefix that all of them
    share (a chat template's system prompt) is counted once, not once per sequence, so the statistics
    are not dominated by the same positions repeated.
    """
    rules = as_rules(rules)
    token_seqs = [list(s) for s in token_seqs]
    shared = shared_prefix_length(token_seqs) if len(token_seqs) > 1 else 0
    graphdef, state = nnx.split(model)
    tapped = nnx.merge(graphdef, state)
    sink = _GramSink()
    for path, value in flatten(nnx.to_pure_dict(nnx.state(tapped, nnx.Param))).items():
        if rules.scheme_for(path) is None:
            continue
        if is_quantized(value) or value.ndim != 3:
            raise ValueError(f"calibration needs a float stacked [L, K, N] weight at {path!r}")
        *parents, name = path.split("/")
        owner = functools.reduce(getattr, parents, tapped)
        L, K, _ = value.shape
        setattr(owner, name, nnx.Param(_Tap(value, jnp.arange(L, dtype=jnp.int32), path, sink)))
        sink.grams[path] = np.zeros((L, K, K), np.float64)
    if not sink.grams:
        raise ValueError(f"quantization rules {rules.rules} match no stacked weight of the model")
    config = model.config
    graphdef, state = nnx.split(tapped)

    @jax.jit
    def run(state, tokens, cache, md):
        out, _ = nnx.merge(graphdef, state).hidden_states(tokens, cache, md)
        return out

    for index, seq in enumerate(token_seqs):
        n = len(seq)
        if n == 0:
            continue
        bucket = -(-n // TOKEN_BUCKET) * TOKEN_BUCKET
        pages = -(-bucket // PAGE_SIZE)
        cache = KVCache.create(config, pages + 1, PAGE_SIZE, model.embed_tokens[...].dtype)
        md = AttentionMetadata.build(np.array([0]), np.array([n]), np.arange(1, pages + 1, dtype=np.int32)[None],
                                     PAGE_SIZE, bucket)
        tokens = np.zeros(bucket, np.int32)
        tokens[:n] = seq
        sink.start, sink.valid = (0 if index == 0 else shared), n
        run(state, jnp.asarray(tokens), cache, md).block_until_ready()
        jax.effects_barrier()
        sink.tokens += n - sink.start
    if sink.tokens == 0:
        raise ValueError("calibration needs at least one non-empty token sequence")
    return sink.grams, sink.tokens


# ---- learning the clipping factors ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """steps / learning_rate: Adam on the clipping factors (steps=0: no clipping); clip_range: where
    factors may go; rank: eigen-directions of G the optimised loss keeps (None = all K); gptq: GPTQ
    on the (clipped) grid after clipping (None = round-to-nearest)."""

    steps: int = 100
    learning_rate: float = 1e-2
    clip_range: tuple[float, float] = (0.3, 1.2)
    rank: int | None = 128
    gptq: GPTQConfig | None = GPTQConfig()

    def __post_init__(self):
        if self.steps < 0 or self.learning_rate <= 0:
            raise ValueError(f"steps={self.steps} must be >= 0 and learning_rate={self.learning_rate} > 0")
        lo, hi = self.clip_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"clip_range={self.clip_range} must satisfy 0 < lo <= 1 <= hi")


def _factor(gram: np.ndarray, rank: int | None) -> np.ndarray:
    """A [r, K] with A^T A ~= gram [K, K] (its top-r eigen-directions), float32."""
    vals, vecs = np.linalg.eigh(gram)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    r = len(vals) if rank is None else min(rank, len(vals))
    return (np.sqrt(np.maximum(vals[:r], 0.0))[:, None] * vecs[:, :r].T).astype(np.float32)


def _relative_error(scheme: QuantScheme, w, a, clip):
    """||A (W - Q(W))||^2 / ||A W||^2 for one layer: w [K, N], a [r, K], clip [clip_shape]."""
    dw = w - scheme.fake_quantize(w, clip)
    return jnp.sum(jnp.square(a @ dw)) / jnp.maximum(jnp.sum(jnp.square(a @ w)), 1e-30)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _learn(scheme: QuantScheme, cfg: CalibrationConfig, w, a):
    """Learned clip [L, ...] for w [L, K, N] with factors a [L, r, K], starting at 1 (round-to-nearest)."""
    lo, hi = cfg.clip_range
    loss = lambda clip: jnp.sum(jax.vmap(functools.partial(_relative_error, scheme))(w, a, clip))  # noqa: E731
    opt = optax.adam(cfg.learning_rate)
    clip = jnp.ones(scheme.clip_shape(w.shape), jnp.float32)

    def step(carry, _):
        clip, opt_state = carry
        grads = jax.grad(loss)(clip)
        updates, opt_state = opt.update(grads, opt_state, clip)
        return (jnp.clip(optax.apply_updates(clip, updates), lo, hi), opt_state), None

    (clip, _), _ = jax.lax.scan(step, (clip, opt.init(clip)), None, length=cfg.steps)
    return clip


@jax.jit
def _column_errors(w, q, gram):
    """Output error of each column, dq_n^T G dq_n: w, q [L, K, N], gram [L, K, K] -> [L, N]."""
    dw = w - q
    return jnp.sum(dw * jnp.matmul(gram, dw, precision=jax.lax.Precision.HIGHEST), axis=-2)


def calibrate_weight(w: jax.Array, gram: np.ndarray, scheme: QuantScheme | str,
                     cfg: CalibrationConfig = CalibrationConfig()) -> tuple[object, np.ndarray, np.ndarray]:
    """(quantized weight, RTN relative error [L], calibrated relative error [L]) for a stacked float
    weight w [L, K, N] whose inputs have Gram matrices gram [L, K, K].

    Relative error of layer l: ||X (W - Q)||^2 / ||X W||^2 with the full G. Candidates: round-to-nearest,
    learned clipping (optax), GPTQ on either grid; the error splits over output columns (and so do the
    grids and GPTQ), so each column takes the candidate with its lowest error: never worse than
    round-to-nearest on the calibration inputs."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    w = jnp.asarray(w, jnp.float32)
    scheme.check_shape(w.shape)
    if w.ndim != 3 or np.shape(gram) != (w.shape[0], w.shape[1], w.shape[1]):
        raise ValueError(f"gram shape {np.shape(gram)} does not match weight shape {tuple(w.shape)} (want [L, K, K])")
    g32 = jnp.asarray(gram, jnp.float32)
    scale = np.maximum(np.asarray(_column_errors(w, jnp.zeros_like(w), g32)).sum(-1), 1e-30)  # ||X W||^2 [L]
    ones = jnp.ones(scheme.clip_shape(w.shape), jnp.float32)
    candidates = [(ones, w)]  # (clip, rows to round): round-to-nearest first
    if cfg.steps:
        candidates.append((_learn(scheme, cfg, w, jnp.asarray(np.stack([_factor(g, cfg.rank) for g in gram]))), w))
    if cfg.gptq is not None:
        candidates += [(clip, _gptq_rows(scheme, w, gram, scheme.grid(w, clip), cfg.gptq)) for clip, _ in candidates]
    clip, rows, best = ones, w, None
    for cand_clip, cand_rows in candidates:  # per output column, the candidate with the lowest error wins
        err = np.asarray(_column_errors(w, scheme.fake_quantize(cand_rows, grid=scheme.grid(w, cand_clip)), g32))
        if best is None:
            rtn = best = err
            continue
        better = jnp.asarray(err < best)
        clip = jnp.where(scheme.per_column(better), cand_clip, clip)
        rows = jnp.where(better[:, None, :], cand_rows, rows)
        best = np.minimum(err, best)
    grid = scheme.grid(w, clip)
    return scheme.quantize(rows, grid=grid), rtn.sum(-1) / scale, best.sum(-1) / scale


def _gptq_rows(scheme, w, gram, grid, cfg: GPTQConfig):
    """GPTQ's rounded rows of every layer of w [L, K, N] on grid (arrays with a leading L axis)."""
    return jnp.stack([gptq_weight(scheme, w[l], gram[l], jax.tree.map(lambda a: a[l], grid), cfg)
                      for l in range(w.shape[0])])


def calibrate_params(weights: dict, grams: dict, quantization: str | QuantRules,
                     cfg: CalibrationConfig = CalibrationConfig()) -> tuple[dict, dict]:
    """``calibrate_weight`` for every path of ``grams`` (from ``collect_input_stats``): flat float
    ``weights`` {path: [L, K, N]} -> ({path: quantized weight}, {path: (rtn_err [L], calibrated_err [L])})."""
    rules = as_rules(quantization)
    calibrated, report = {}, {}
    for path, gram in grams.items():
        scheme = rules.scheme_for(path)
        if scheme is None:
            continue
        weight, rtn, cal = calibrate_weight(weights[path], gram, scheme, cfg)
        calibrated[path], report[path] = weight, (rtn, cal)
    return calibrated, report


def calibrate_model(model: nnx.Module, token_seqs, quantization: str | QuantRules,
                    cfg: CalibrationConfig = CalibrationConfig()) -> tuple[dict, dict]:
    """({path: quantized weight} for ``quantize_model(model, quantization, calibrated)``,
    {path: (rtn_err [L], calibrated_err [L])}): input statistics on ``token_seqs``, then ``calibrate_params``."""
    grams, _ = collect_input_stats(model, token_seqs, quantization)
    return calibrate_params(flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))), grams, quantization, cfg)
