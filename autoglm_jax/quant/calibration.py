"""Calibration: quantized weights that minimise each linear layer's output error on the model's own
activations, chosen per output column among several candidates.

Owns: ``CalibrationConfig``, ``calibrate_weight`` (one stacked weight and its input Grams -> its
quantized weight), ``calibrate_params`` / ``calibrate_model`` (every ruled weight of a model). Does not
own the statistics (``quant.activation_stats``), the schemes (``quant.schemes``), GPTQ's rounding
(``quant.gptq``), the grid fits (``quant.grid_fit``), activation-aware scaling (``quant.awq``) or
placing the weights (``quant.transform``).

Objective, per layer l with input activations X [T, K] and weight W [K, N]:
    err = ||X W - X Q(W)||^2 / ||X W||^2 = tr(dW^T G dW) / tr(W^T G W),   G = X^T X
Steps for one stacked weight [L, K, N]:
  1. grids: round-to-nearest's; clipping factors learned with optax (Adam through the straight-through
     rounding of ``quant.ste``, on a rank-r factor A of G, A^T A ~= G); clipping factors searched per
     scale (``grid_fit.search_clip``);
  2. on each grid: its round-to-nearest rows, GPTQ's rows, and GPTQ's codes with least-squares scales
     (``grid_fit.refit_scales``);
  3. per output column the candidate with the lowest error on the full G wins (error, grids and GPTQ
     all split over output columns); round-to-nearest is a candidate, so never worse than RTN on the
     calibration inputs;
  4. only with ``awq_alphas`` (int4; off by default: on SmolLM2 it made GPTQ's result worse,
     benchmarks/RESULTS.md "Quantization quality"): activation-aware input scales a per layer (``quant.awq``), steps
     1-3 again on the scaled problem (w / a, diag(a) G diag(a)), which has the same errors, and per
     layer the scaled result only where its error is lower than step 3's (a is shared by all columns).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from autoglm_jax.quant.activation_stats import collect_input_stats
from autoglm_jax.quant.awq import SCALED_FAMILIES, choose_input_scales, scaled_problem
from autoglm_jax.quant.gptq import GPTQConfig, gptq_weight
from autoglm_jax.quant.grid_fit import REFIT_FAMILIES, refit_scales, search_clip
from autoglm_jax.quant.schemes import QuantScheme, get_scheme
from autoglm_jax.quant.transform import QuantRules, as_rules
from autoglm_jax.tree_paths import flatten

AWQ_ALPHAS = tuple(i / 8 for i in range(9))  # 0 (no scaling), 0.125, ..., 1: ``awq_alphas`` to try AWQ


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """steps / learning_rate: Adam on the clipping factors (0: no learned clipping); clip_range: where
    factors may go; rank: eigen-directions of G the learned clipping and the AWQ search keep (None =
    all K); search: clipping factors tried per scale, evenly from clip_range[0] to 1 (0: no search);
    awq_alphas: exponents tried for activation-aware input scales (empty, the default: none;
    e.g. AWQ_ALPHAS; int4 only);
    gptq: GPTQ on every grid (None: no GPTQ); refit: least-squares scales for GPTQ's codes."""

    steps: int = 100
    learning_rate: float = 1e-2
    clip_range: tuple[float, float] = (0.3, 1.2)
    rank: int | None = 128
    search: int = 15
    awq_alphas: tuple[float, ...] = ()
    gptq: GPTQConfig | None = GPTQConfig()
    refit: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.learning_rate <= 0 or self.search < 0:
            raise ValueError(f"steps={self.steps} and search={self.search} must be >= 0 and "
                             f"learning_rate={self.learning_rate} > 0")
        lo, hi = self.clip_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"clip_range={self.clip_range} must satisfy 0 < lo <= 1 <= hi")
        if any(not 0 <= alpha <= 1 for alpha in self.awq_alphas):
            raise ValueError(f"awq_alphas={self.awq_alphas} must lie in [0, 1]")

    def search_factors(self) -> tuple[float, ...]:
        return tuple(float(f) for f in np.linspace(1.0, self.clip_range[0], self.search)) if self.search else ()


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
    weight w [L, K, N] whose inputs have Gram matrices gram [L, K, K] (steps: module docstring).
    Relative error of layer l: ||X (W - Q)||^2 / ||X W||^2 with the full G."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    w = jnp.asarray(w, jnp.float32)
    scheme.check_shape(w.shape)
    if w.ndim != 3 or np.shape(gram) != (w.shape[0], w.shape[1], w.shape[1]):
        raise ValueError(f"gram shape {np.shape(gram)} does not match weight shape {tuple(w.shape)} (want [L, K, K])")
    gram = np.asarray(gram, np.float64)
    g32 = jnp.asarray(gram, jnp.float32)
    scale = np.maximum(np.asarray(_column_errors(w, jnp.zeros_like(w), g32)).sum(-1), 1e-30)  # ||X W||^2 [L]
    rtn = np.asarray(_column_errors(w, scheme.fake_quantize(w), g32))                      # [L, N]
    awq = bool(cfg.awq_alphas) and scheme.family in SCALED_FAMILIES
    factor = jnp.asarray(np.stack([_factor(g, cfg.rank) for g in gram])) if cfg.steps or awq else None
    grid, rows, best = _best_per_column(scheme, cfg, w, gram, factor)                    # steps 1-3
    if not awq:
        return scheme.quantize(rows, grid=grid), rtn.sum(-1) / scale, best.sum(-1) / scale
    diag = jnp.asarray(np.diagonal(gram, axis1=-2, axis2=-1), jnp.float32)                # step 4
    in_scales, _ = choose_input_scales(scheme, w, factor, tuple(cfg.awq_alphas), diag)
    w_s, gram_s = scaled_problem(w, gram, in_scales)
    s_grid, s_rows, s_best = _best_per_column(scheme, cfg, w_s, gram_s, factor * in_scales[:, None, :])
    keep = s_best.sum(-1) < best.sum(-1)  # [L]: the scaled layer only where it is better
    in_scales = jnp.where(keep[:, None], in_scales, 1.0)
    grid = tuple(jnp.where(keep.reshape(-1, *[1] * (s.ndim - 1)), s, g) for s, g in zip(s_grid, grid))
    rows = jnp.where(keep[:, None, None], s_rows, rows)
    best = np.where(keep[:, None], s_best, best)
    weight = dataclasses.replace(scheme.quantize(rows, grid=grid), in_scales=in_scales)
    return weight, rtn.sum(-1) / scale, best.sum(-1) / scale


def _best_per_column(scheme: QuantScheme, cfg: CalibrationConfig, w, gram, factor):
    """(grid, rows, error [L, N]) for w [L, K, N] with Grams gram [L, K, K]: per output column the best
    candidate (steps 2-4 of the module docstring)."""
    g32 = jnp.asarray(gram, jnp.float32)
    grids = [scheme.grid(w)]
    if cfg.steps:
        grids.append(scheme.grid(w, _learn(scheme, cfg, w, factor)))
    if cfg.search:
        diag = jnp.asarray(np.diagonal(gram, axis1=-2, axis2=-1), jnp.float32)
        grids.append(scheme.grid(w, search_clip(scheme, w, diag, cfg.search_factors())))
    grid, rows, best = None, None, None
    for cand_grid, cand_rows in _candidates(scheme, cfg, w, gram, grids):
        err = np.asarray(_column_errors(w, scheme.fake_quantize(cand_rows, grid=cand_grid), g32))
        if best is None:
            grid, rows, best = cand_grid, cand_rows, err
            continue
        better = jnp.asarray(err < best)
        grid = tuple(jnp.where(scheme.per_column(better), c, g) for c, g in zip(cand_grid, grid))
        rows = jnp.where(better[:, None, :], cand_rows, rows)
        best = np.minimum(err, best)
    return grid, rows, best


def _candidates(scheme: QuantScheme, cfg: CalibrationConfig, w, gram, grids):
    """(grid, rows) pairs: each grid with w's rows (round-to-nearest), GPTQ's rows and GPTQ's codes on
    refitted scales."""
    for grid in grids:
        yield grid, w
        if cfg.gptq is None:
            continue
        rows = _gptq_rows(scheme, w, gram, grid, cfg.gptq)
        yield grid, rows
        if cfg.refit and scheme.family in REFIT_FAMILIES:
            refits = [refit_scales(scheme, w[l], rows[l], _layer(grid, l), gram[l]) for l in range(w.shape[0])]
            yield tuple(jnp.stack(a) for a in zip(*(g for g, _ in refits))), jnp.stack([r for _, r in refits])


def _layer(grid: tuple, layer: int) -> tuple:
    return tuple(a[layer] for a in grid)


def _gptq_rows(scheme, w, gram, grid, cfg: GPTQConfig):
    """GPTQ's rounded rows of every layer of w [L, K, N] on grid (arrays with a leading L axis)."""
    return jnp.stack([gptq_weight(scheme, w[l], gram[l], _layer(grid, l), cfg)
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
