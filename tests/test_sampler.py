"""On-device sampler against numpy references of vLLM's formulas, plus determinism and jit behaviour."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.outputs import Logprob, make_logprob_dict
from autoglm_jax.sampler import (
    SamplingTensors,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    reset_rows,
    sample,
    update_output_counts,
)
from autoglm_jax.sampling_params import SamplingParams

sample_jit = jax.jit(sample, static_argnames="num_logprobs")


def _rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _state(batch, vocab):
    return jnp.zeros((batch, vocab), jnp.int32), jnp.zeros((batch, vocab), bool)


def _run(logits, params, seeds=None, steps=None, bucket=None, counts=None, prompt_mask=None, num_logprobs=0,
         eos=()):
    logits = jnp.asarray(logits)
    bucket = bucket or logits.shape[0]
    seeds = list(range(len(params))) if seeds is None else seeds
    steps = [0] * len(params) if steps is None else steps
    tensors = SamplingTensors.from_params(params, seeds, steps, bucket, eos_token_ids=eos)
    zero_counts, zero_mask = _state(*logits.shape)
    counts = zero_counts if counts is None else jnp.asarray(counts)
    prompt_mask = zero_mask if prompt_mask is None else jnp.asarray(prompt_mask)
    return sample_jit(logits, tensors, counts, prompt_mask, num_logprobs=num_logprobs)


# ---------------------------------------------------------------- numpy references of vLLM's formulas


def _np_penalties(logits, counts, prompt_mask, presence, frequency, repetition):
    output_mask = counts > 0
    seen = prompt_mask | output_mask
    rep = repetition[:, None]
    logits = logits * np.where(seen & (logits > 0), 1.0 / rep, 1.0) * np.where(seen & (logits <= 0), rep, 1.0)
    return logits - frequency[:, None] * counts - presence[:, None] * output_mask


def _np_filtered_probs(logits, temperature, top_k, top_p, min_p):
    """vLLM: / temperature, min_p on probs, then top-k / top-p on the ascending sort. logits [V]."""
    x = logits.astype(np.float64) / temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    x = np.where(probs < probs.max() * min_p, -np.inf, x)
    order = np.argsort(x)  # ascending
    xs = x[order]
    if top_k > 0:
        xs = np.where(xs < xs[len(xs) - top_k], -np.inf, xs)
    ps = np.exp(xs - xs.max())
    ps /= ps.sum()
    drop = np.cumsum(ps) <= 1 - top_p
    drop[-1] = False
    xs = np.where(drop, -np.inf, xs)
    out = np.empty_like(xs)
    out[order] = xs
    probs = np.exp(out - out.max())
    return probs / probs.sum()


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------- greedy


def test_greedy_equals_argmax_all_greedy_and_mixed_batch(request):
    rng = _rng(request)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    expected = logits.argmax(-1)
    out = _run(logits, [SamplingParams(temperature=0.0)] * 6)
    np.testing.assert_array_equal(np.asarray(out.token_ids), expected)
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=1)] * 3
    out = _run(logits, mixed)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[::2], expected[::2])


def test_top_k_one_equals_greedy(request):
    rng = _rng(request)
    logits = rng.normal(size=(16, 40)).astype(np.float32)
    out = _run(logits, [SamplingParams(temperature=1.0, top_k=1)] * 16, seeds=list(range(100, 116)))
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


def test_padding_rows_are_greedy(request):
    rng = _rng(request)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    out = _run(logits, [SamplingParams(temperature=1.0), None], seeds=[3, 0], steps=[0, 0], bucket=4)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[1:], logits.argmax(-1)[1:])


# ---------------------------------------------------------------- randomness


def test_seeded_sampling_reproducible_and_independent_of_batch(request):
    rng = _rng(request)
    vocab = 16
    row = rng.normal(scale=0.5, size=vocab).astype(np.float32)
    target = SamplingParams(temperature=1.0, seed=1234)
    tokens_alone, tokens_mixed = [], []
    for step in range(12):
        out = _run(row[None], [target], seeds=[1234], steps=[step])
        tokens_alone.append(int(out.token_ids[0]))
        # 8-row bucket, target in row 5, neighbours greedy / filtered / unseeded, other logits.
        others = rng.normal(size=(8, vocab)).astype(np.float32)
        others[5] = row
        params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=3),
                  SamplingParams(temperature=1.2, top_p=0.5), None, SamplingParams(min_p=0.1), target]
        out = _run(others, params, seeds=[9, 8, 7, 0, 6, 1234], steps=[3, 1, 4, 0, 5, step], bucket=8)
        tokens_mixed.append(int(out.token_ids[5]))
    assert tokens_alone == tokens_mixed
    assert len(set(tokens_alone)) > 1, "step must change the random draw"
    rerun = [int(_run(row[None], [target], seeds=[1234], steps=[s]).token_ids[0]) for s in range(12)]
    assert rerun == tokens_alone


def test_different_seeds_give_different_draws(request):
    rng = _rng(request)
    logits = np.repeat(rng.normal(scale=0.3, size=(1, 32)).astype(np.float32), 64, axis=0)
    out = _run(logits, [SamplingParams(temperature=1.0)] * 64, seeds=list(range(64)))
    assert len(set(np.asarray(out.token_ids).tolist())) > 8


FILTER_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=6, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("kwargs", FILTER_CASES, ids=[str(c) for c in FILTER_CASES])
def test_filters_restrict_support_and_match_distribution(kwargs, request):
    rng = _rng(request)
    vocab, draws = 10, 4000
    row = rng.normal(size=vocab).astype(np.float32)
    params = SamplingParams(**kwargs)
    out = _run(np.repeat(row[None], draws, axis=0), [params] * draws, seeds=list(range(draws)))
    expected = _np_filtered_probs(row, params.temperature, max(params.top_k, 0), params.top_p, params.min_p)
    counts = np.bincount(np.asarray(out.token_ids), minlength=vocab)
    excluded = expected == 0
    assert counts[excluded].sum() == 0, f"sampled excluded tokens {np.nonzero(counts * excluded)[0]}"
    support = ~excluded
    if support.sum() > 1:
        exp = expected[support] * draws
        chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
        assert chi2 < 35.0, f"chi2={chi2:.1f} counts={counts} expected={np.round(expected * draws)}"


def test_filter_support_matches_vllm_reference_on_many_rows(request):
    rng = _rng(request)
    batch, vocab = 256, 24
    logits = rng.normal(scale=2.0, size=(batch, vocab)).astype(np.float32)
    top_k = rng.integers(0, vocab + 3, batch).astype(np.int32)
    top_p = np.where(rng.random(batch) < 0.3, 1.0, rng.uniform(0.05, 1.0, batch)).astype(np.float32)
    min_p = np.where(rng.random(batch) < 0.5, 0.0, rng.uniform(0.0, 0.5, batch)).astype(np.float32)
    after_min_p = apply_min_p(jnp.asarray(logits), jnp.asarray(min_p))
    got = apply_top_k_top_p(after_min_p, jnp.asarray(top_k), jnp.asarray(top_p))
    got_support = np.isfinite(np.asarray(got))
    want_support = np.stack([
        _np_filtered_probs(logits[b], 1.0, int(top_k[b]) if top_k[b] <= vocab else 0, float(top_p[b]),
                           float(min_p[b])) > 0 for b in range(batch)])
    bad = np.nonzero((got_support != want_support).any(-1))[0]
    assert bad.size == 0, f"rows {bad[:5]}: top_k={top_k[bad[:5]]} top_p={top_p[bad[:5]]} min_p={min_p[bad[:5]]}"
    assert 1 < want_support.sum(-1).mean() < vocab - 1, "filters too weak or too strong to test anything"


def test_disabled_filters_keep_every_token_even_when_mass_rounds_to_one(request):
    rng = _rng(request)
    logits = rng.normal(size=(2, 64)).astype(np.float32) - 20.0
    logits[:, 5] = 30.0  # the top token alone has f32 probability 1.0
    got = np.asarray(apply_top_k_top_p(jnp.asarray(logits), jnp.asarray([0, 64], jnp.int32),
                                       jnp.asarray([1.0, 1.0], jnp.float32)))
    assert np.isfinite(got).all()


# ---------------------------------------------------------------- penalties and min_tokens


def test_penalties_match_numpy_vllm_formula(request):
    rng = _rng(request)
    batch, vocab = 5, 64
    logits = rng.normal(scale=3.0, size=(batch, vocab)).astype(np.float32)
    counts = rng.integers(0, 4, size=(batch, vocab)) * (rng.random((batch, vocab)) < 0.3)
    prompt_mask = rng.random((batch, vocab)) < 0.2
    presence = rng.uniform(-2, 2, batch).astype(np.float32)
    frequency = rng.uniform(-2, 2, batch).astype(np.float32)
    repetition = rng.uniform(0.5, 2.0, batch).astype(np.float32)
    params = [SamplingParams(presence_penalty=float(presence[b]), frequency_penalty=float(frequency[b]),
                             repetition_penalty=float(repetition[b])) for b in range(batch)]
    tensors = SamplingTensors.from_params(params, [0] * batch, [0] * batch, batch)
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts, jnp.int32),
                                     jnp.asarray(prompt_mask), tensors))
    want = _np_penalties(logits.astype(np.float64), counts, prompt_mask, presence.astype(np.float64),
                         frequency.astype(np.float64), repetition.astype(np.float64))
    err = np.abs(got - want)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5), f"max err {err.max():.2e} mean {err.mean():.2e}"
    assert (np.abs(got - logits) > 1e-3).sum() > 10, "penalties had no effect; test inputs are too weak"
    greedy = [SamplingParams(temperature=0.0, presence_penalty=p.presence_penalty,
                             frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty)
              for p in params]
    out = _run(logits, greedy, counts=counts.astype(np.int32), prompt_mask=prompt_mask)
    np.testing.assert_array_equal(np.asarray(out.token_ids), want.argmax(-1))


def test_min_tokens_blocks_eos_and_stop_ids_until_reached(request):
    rng = _rng(request)
    vocab, eos, stop_id = 20, 3, 11
    logits = rng.normal(size=(1, vocab)).astype(np.float32)
    logits[0, eos], logits[0, stop_id] = 50.0, 40.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop_id])
    tokens = [int(_run(logits, [params], steps=[s], eos=[eos]).token_ids[0]) for s in range(3)]
    second_best = int(np.argsort(logits[0])[-3])
    assert tokens == [second_best, second_best, eos]
    tensors = SamplingTensors.from_params([params, SamplingParams()], [0, 0], [0, 0], 2, eos_token_ids=[eos])
    masked = np.asarray(apply_min_tokens(jnp.asarray(np.repeat(logits, 2, 0)), tensors))
    assert np.isneginf(masked[0, [eos, stop_id]]).all() and np.isfinite(masked[0]).sum() == vocab - 2
    assert np.isfinite(masked[1]).all()
    # The device mask itself stops at step == min_tokens, whatever stop ids it is handed.
    reached = dataclasses.replace(tensors, step=jnp.asarray([2, 0], jnp.int32))
    assert np.isfinite(np.asarray(apply_min_tokens(jnp.asarray(np.repeat(logits, 2, 0)), reached))).all()


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)])
def test_logprobs_are_raw_log_softmax_with_sorted_top_and_rank(dtype, tol, request):
    rng = _rng(request)
    batch, vocab, num = 6, 48, 5
    logits = jnp.asarray(rng.normal(scale=2.0, size=(batch, vocab)), dtype)
    counts = jnp.asarray(rng.integers(0, 3, size=(batch, vocab)), jnp.int32)
    # one row asking for logprobs is enough: the ranks / top-N are computed for the whole batch
    params = [SamplingParams(temperature=1.4, repetition_penalty=1.3, frequency_penalty=0.5)] * (batch - 1)
    params.append(SamplingParams(temperature=1.4, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=num))
    out = _run(logits, params, counts=counts, num_logprobs=num)
    raw = _log_softmax(np.asarray(logits.astype(jnp.float32)))
    tokens = np.asarray(out.token_ids)
    want_lp = raw[np.arange(batch), tokens]
    err = np.abs(np.asarray(out.logprob) - want_lp)
    assert err.max() < tol, f"max err {err.max():.2e} mean {err.mean():.2e}"
    np.testing.assert_array_equal(np.asarray(out.rank), (raw >= want_lp[:, None] - 1e-7).sum(-1))
    top, top_ids = np.asarray(out.top_logprobs), np.asarray(out.top_token_ids)
    assert top.shape == (batch, num) and top_ids.shape == (batch, num)
    assert (np.diff(top, axis=-1) <= 0).all()
    np.testing.assert_array_equal(top_ids, np.argsort(-raw, axis=-1, kind="stable")[:, :num])
    np.testing.assert_allclose(top, np.take_along_axis(raw, top_ids, -1), atol=tol)


def test_ranks_and_top_logprobs_are_skipped_when_no_row_wants_logprobs(request):
    rng = _rng(request)
    logits = rng.normal(scale=2.0, size=(4, 40)).astype(np.float32)
    out = _run(logits, [SamplingParams(temperature=0.7, seed=3)] * 4, num_logprobs=3)
    raw = _log_softmax(logits)
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprob), raw[np.arange(4), tokens], atol=1e-5)  # always computed
    assert not np.asarray(out.rank).any() and not np.asarray(out.top_token_ids).any()
    assert not np.asarray(out.top_logprobs).any() and out.top_logprobs.shape == (4, 3)
    wanted = _run(logits, [SamplingParams(temperature=0.7, seed=3, logprobs=0)] * 4, num_logprobs=3)
    np.testing.assert_array_equal(np.asarray(wanted.token_ids), tokens)  # same draws either way
    assert (np.asarray(wanted.rank) >= 1).all()


def test_zero_logprobs_still_gives_sampled_logprob(request):
    rng = _rng(request)
    logits = rng.normal(size=(3, 24)).astype(np.float32)
    out = _run(logits, [SamplingParams(temperature=0.0, logprobs=0)] * 3)
    assert out.top_logprobs.shape == (3, 0)
    np.testing.assert_array_equal(np.asarray(out.rank), [1, 1, 1])


def test_make_logprob_dict_vllm_layout():
    d = make_logprob_dict(7, -2.5, 4, [1, 2, 3], [-0.5, -1.0, -2.0], decode=lambda t: f"<{t}>")
    assert list(d) == [7, 1, 2, 3]
    assert d[7] == Logprob(-2.5, 4, "<7>") and d[2] == Logprob(-1.0, 2, "<2>")
    d = make_logprob_dict(2, -1.0, 2, [1, 2], [-0.5, -1.0])
    assert list(d) == [2, 1] and d[2].rank == 2 and d[2].decoded_token is None


# ---------------------------------------------------------------- jit behaviour


def test_sample_does_not_retrace_for_new_parameter_values(request):
    rng = _rng(request)
    traces = []

    def traced_sample(*args, **kwargs):
        traces.append(1)
        return sample(*args, **kwargs)

    fn = jax.jit(traced_sample, static_argnames="num_logprobs")
    batch, vocab = 4, 32
    counts, mask = _state(batch, vocab)
    param_sets = [
        [SamplingParams(temperature=0.0)] * 4,
        [SamplingParams(temperature=0.5, top_k=3, seed=1), None, SamplingParams(top_p=0.3), None],
        [SamplingParams(min_p=0.5, presence_penalty=1.0, min_tokens=2, stop_token_ids=[1, 2])] * 3,
    ]
    for step, params in enumerate(param_sets):
        tensors = SamplingTensors.from_params(params, [5] * len(params), [step] * len(params), batch, [0])
        logits = jnp.asarray(rng.normal(size=(batch, vocab)), jnp.float32)
        fn(logits, tensors, counts, mask, num_logprobs=2).token_ids.block_until_ready()
    assert len(traces) == 1


# ---------------------------------------------------------------- host construction and state helpers


def test_from_params_layout_and_errors():
    params = [SamplingParams(top_k=-1, temperature=0.8, min_tokens=3, stop_token_ids=[9, 8, 7, 6]), None]
    t = SamplingTensors.from_params(params, [2**33 + 5, 0], [1, 0], 4, eos_token_ids=[2])
    assert t.batch_size == 4
    np.testing.assert_array_equal(np.asarray(t.top_k), [0, 0, 0, 0])
    np.testing.assert_allclose(np.asarray(t.temperature), [0.8, 0, 0, 0])
    assert int(t.seed[0]) == 5
    assert t.stop_token_ids.shape == (4, 8)
    np.testing.assert_array_equal(np.asarray(t.stop_token_ids[0]), [2, 9, 8, 7, 6, -1, -1, -1])
    assert (np.asarray(t.stop_token_ids[1:]) == -1).all()
    fixed = SamplingTensors.from_params(params, [0, 0], [1, 0], 4, eos_token_ids=[2], stop_ids_width=16)
    assert fixed.stop_token_ids.shape == (4, 16)
    np.testing.assert_array_equal(np.asarray(fixed.stop_token_ids[0, :6]), [2, 9, 8, 7, 6, -1])
    with pytest.raises(ValueError, match="stop_ids_width=3"):
        SamplingTensors.from_params(params, [0, 0], [1, 0], 4, eos_token_ids=[2], stop_ids_width=3)
    with pytest.raises(ValueError, match="batch_bucket=1"):
        SamplingTensors.from_params(params, [0, 0], [0, 0], 1)
    with pytest.raises(ValueError, match="differ in length"):
        SamplingTensors.from_params(params, [0], [0, 0], 4)


def test_update_output_counts_and_reset_rows(request):
    rng = _rng(request)
    batch, vocab = 4, 12
    counts = jnp.asarray(rng.integers(0, 3, size=(batch, vocab)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, vocab)) < 0.5)
    rows = jnp.asarray([0, 2, 2, -1], jnp.int32)
    tokens = jnp.asarray([5, 7, 7, 3], jnp.int32)
    want = np.asarray(counts).copy()
    want[0, 5] += 1
    want[2, 7] += 2
    np.testing.assert_array_equal(np.asarray(update_output_counts(counts, rows, tokens)), want)

    prompts = jnp.asarray([[1, 4, 4, -1], [0, 11, -1, -1], [9, 9, 9, 9]], jnp.int32)
    new_counts, new_mask = reset_rows(counts, mask, jnp.asarray([3, 1, -1], jnp.int32), prompts)
    want_counts, want_mask = np.asarray(counts).copy(), np.asarray(mask).copy()
    want_counts[[3, 1]] = 0
    want_mask[3] = np.isin(np.arange(vocab), [1, 4])
    want_mask[1] = np.isin(np.arange(vocab), [0, 11])
    np.testing.assert_array_equal(np.asarray(new_counts), want_counts)
    np.testing.assert_array_equal(np.asarray(new_mask), want_mask)
