"""Sampler behaviour on a tiny random model: filters, seeds, batching invariance, bad input."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwjax
from kwjax.models.gemma3 import config as cfglib
from kwjax.sampling import Sampler, SamplingConfig, SamplingError, filter_logits


@pytest.fixture(scope="module")
def tiny_model():
    config = cfglib.tiny(vocab_size=64, sliding_window=6)
    params = kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(0))
    # A smaller embedding keeps the tied output from simply repeating the input token, so the
    # distributions are broad enough for seeds and filters to matter.
    params = {**params, "embedding": params["embedding"] * 0.1}
    return kwjax.LoadedModel(config, params, None, "tiny")


PROMPTS = [[2, 5, 9, 11], [2, 7], [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13], [2, 40, 41]]


def numpy_filter(logits, top_k, top_p):
    """Independent reference: sort each row, keep the top k, then the smallest prefix reaching p."""
    out = np.full_like(logits, -np.inf)
    for r, row in enumerate(logits):
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        mass, chosen = 0.0, []
        for idx, p in zip(keep, probs):
            if mass >= top_p:
                break
            chosen.append(idx)
            mass += p
        out[r, chosen] = row[chosen]
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (0, 0.9), (8, 0.7), (1, 1.0)])
def test_filters_match_numpy_reference(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 2
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    ref = numpy_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ref), ours > np.finfo(np.float32).min)
    np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)])


@pytest.mark.parametrize("scale, top_k, top_p", [(6.0, 0, 0.9), (6.0, 100, 0.95), (0.05, 0, 0.9), (0.05, 0, 0.3)])
def test_nucleus_over_candidates_is_exact(scale, top_k, top_p):
    """Peaked rows find the nucleus among 64 candidates; flat ones (scale 0.05: the nucleus spans
    thousands of tokens) take the full-sort fallback. Both equal the sorted numpy reference."""
    logits = (np.random.default_rng(1).normal(size=(3, 4096)) * scale).astype(np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p, candidates=64))
    ref = numpy_filter(logits, top_k, top_p)
    kept = np.isfinite(ref)
    if scale > 1:
        assert kept.sum(axis=1).max() < 64  # the fast path was the one exercised
    else:
        assert kept.sum(axis=1).min() > 64  # the fallback was needed
    np.testing.assert_array_equal(kept, ours > np.finfo(np.float32).min)


@pytest.mark.parametrize("scale, top_k, top_p", [(3.0, 0, 0.9), (3.0, 6, 1.0), (3.0, 8, 0.7), (0.05, 0, 0.9)])
def test_draws_follow_the_filtered_distribution(scale, top_k, top_p):
    """20 000 draws from one row (each with its own key) against the numpy reference's renormalised
    kept mass: peaked rows (scale 3) are drawn among 16 candidates, the flat one (scale 0.05: the
    nucleus spans ~90 % of 64 tokens) by the whole-vocabulary fallback. Tolerance: 5 binomial sigmas."""
    from kwjax.sampling import sample_filtered

    row = (np.random.default_rng(2).normal(size=(1, 64)) * scale).astype(np.float32)
    ref = numpy_filter(row, top_k, top_p)[0]
    p_ref = np.where(np.isfinite(ref), np.exp(ref - ref[np.isfinite(ref)].max()), 0.0)
    p_ref /= p_ref.sum()
    n = 20_000
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(7), jnp.arange(n))
    draws = np.asarray(jax.jit(lambda l, k: sample_filtered(l, k, top_k, top_p, candidates=16))(
        jnp.asarray(np.repeat(row, n, axis=0)), keys))
    freq = np.bincount(draws, minlength=64) / n
    full = np.exp(row[0] - row[0].max()) / np.exp(row[0] - row[0].max()).sum()
    top16_mass = np.sort(full)[::-1][:16].sum()
    assert (top16_mass >= top_p or top_k) if scale > 1 else top16_mass < top_p  # which path ran
    assert freq[p_ref == 0].sum() == 0  # nothing outside the kept set, ever
    assert np.all(np.abs(freq - p_ref) <= 5 * np.sqrt(p_ref * (1 - p_ref) / n) + 1e-9)


def _frequencies(fn, rows_RV: np.ndarray, n: int, seed: int = 7) -> np.ndarray:
    """Per-row draw frequencies of `fn(logits or probs, keys)` over `n` keys per row (each row's
    copies share a batch with the other rows' copies)."""
    R, V = rows_RV.shape
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), jnp.arange(n * R))
    draws = np.asarray(jax.jit(fn)(jnp.asarray(np.tile(rows_RV, (n, 1))), keys)).reshape(n, R)
    return np.stack([np.bincount(draws[:, r], minlength=V) / n for r in range(R)])


def _within_5_sigma(freq: np.ndarray, p: np.ndarray, n: int) -> bool:
    """Binomial 5 sigma, plus 3 draws of slack: over hundreds of ids of probability ~1e-6, one chance
    draw is ~10 sigma of a normal approximation that does not hold there."""
    return bool(np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 3 / n))


def test_inverse_cdf_draw_follows_probabilities_and_skips_zeros():
    """1000 ids (two blocks of 512, the second padded), a fifth of them impossible: 20 000 draws per row
    against the probabilities, nothing ever drawn at probability 0 (including the padding)."""
    from kwjax.sampling import draw_inverse_cdf

    rng = np.random.default_rng(4)
    p = rng.gamma(0.3, size=(2, 1000))
    p[:, rng.permutation(1000)[:200]] = 0.0
    p[1, 600:] = 0.0  # the second row's mass ends inside the first block of the padded one
    p /= p.sum(axis=1, keepdims=True)
    n = 20_000
    freq = _frequencies(draw_inverse_cdf, p.astype(np.float32), n)
    assert freq[p == 0].sum() == 0
    assert _within_5_sigma(freq, p, n)


@pytest.mark.parametrize("rounds", [32, 0])
def test_rejection_nucleus_follows_each_rows_filtered_distribution(rounds):
    """A flat row (nucleus ~90 % of 64 ids) and a peaked one in the same batch, drawn by rejection
    (`rounds=0`: every row by the exact bisection fallback), each against the sorted numpy reference."""
    from kwjax.sampling import sample_nucleus_by_rejection

    rng = np.random.default_rng(5)
    rows = np.stack([rng.normal(size=64) * 0.05, rng.normal(size=64) * 3.0]).astype(np.float32)
    ref = numpy_filter(rows, 0, 0.9)
    p_ref = np.where(np.isfinite(ref), np.exp(np.where(np.isfinite(ref), ref, 0) - rows.max(1, keepdims=True)), 0)
    p_ref /= p_ref.sum(axis=1, keepdims=True)
    assert (p_ref > 0).sum(1)[0] > 40 and (p_ref > 0).sum(1)[1] < 20
    n = 20_000
    freq = _frequencies(lambda l, k: sample_nucleus_by_rejection(l, k, 0.9, rounds=rounds), rows, n)
    assert freq[p_ref == 0].sum() == 0
    assert _within_5_sigma(freq, p_ref, n)


def test_temperature_sampling_follows_the_softmax():
    """No filter: the plain tempered distribution (drawn by inverse CDF over the whole vocabulary)."""
    from kwjax.sampling import choose

    row = (np.random.default_rng(6).normal(size=(1, 64)) * 2).astype(np.float32)
    cfg = SamplingConfig(temperature=1.5)
    n = 20_000
    freq = _frequencies(lambda l, k: choose(l, k, cfg)[0], row, n)
    p = np.exp(row[0] / 1.5 - (row[0] / 1.5).max())
    assert _within_5_sigma(freq[0], p / p.sum(), n)


def test_top_k_one_equals_greedy(tiny_model):
    sampler = Sampler(tiny_model, batch_size=4)
    greedy = sampler.generate(PROMPTS, SamplingConfig(12, greedy=True))
    top1 = sampler.generate(PROMPTS, SamplingConfig(12, temperature=1.7, top_k=1, seed=3))
    assert [s.tokens for s in greedy] == [s.tokens for s in top1]
    chex.assert_trees_all_close([s.logprobs for s in greedy], [s.logprobs for s in top1], atol=1e-6)


def test_seed_reproduces_and_differs(tiny_model):
    sampler = Sampler(tiny_model, batch_size=4)
    cfg = SamplingConfig(16, temperature=1.0, seed=11)
    a = [s.tokens for s in sampler.generate(PROMPTS, cfg)]
    b = [s.tokens for s in sampler.generate(PROMPTS, cfg)]
    c = [s.tokens for s in sampler.generate(PROMPTS, SamplingConfig(16, temperature=1.0, seed=12))]
    assert a == b
    assert a != c


def test_batching_does_not_change_results(tiny_model):
    """Left padding and batch composition must not change what a prompt produces."""
    cfg = SamplingConfig(10, temperature=1.0, seed=5)
    together = Sampler(tiny_model, batch_size=4).generate(PROMPTS, cfg)
    in_pairs = Sampler(tiny_model, batch_size=2).generate(PROMPTS, cfg)
    assert [s.tokens for s in together] == [s.tokens for s in in_pairs]
    alone = [Sampler(tiny_model, batch_size=1).generate([p], SamplingConfig(10, greedy=True))[0] for p in PROMPTS]
    batched = Sampler(tiny_model, batch_size=4).generate(PROMPTS, SamplingConfig(10, greedy=True))
    assert [s.tokens for s in alone] == [s.tokens for s in batched]
    chex.assert_trees_all_close([s.logprobs for s in alone], [s.logprobs for s in batched], atol=1e-4)


def test_logprobs_are_under_the_untempered_model(tiny_model):
    """Reported log-probs come from one full forward pass over prompt + generation, at T=1."""
    sample = Sampler(tiny_model, batch_size=1).generate([PROMPTS[0]], SamplingConfig(8, temperature=2.5, seed=1))[0]
    seq = PROMPTS[0] + sample.tokens
    logits = tiny_model.logits(np.asarray(seq)[None])[0]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    expected = [logp[len(PROMPTS[0]) - 1 + i, t] for i, t in enumerate(sample.tokens)]
    chex.assert_trees_all_close(np.asarray(sample.logprobs), np.asarray(expected), atol=1e-4)


def test_stop_tokens_end_rows(tiny_model):
    sampler = Sampler(tiny_model, batch_size=4)
    free = sampler.generate(PROMPTS, SamplingConfig(12, greedy=True))
    assert all(s.stop_reason == "max_new_tokens" and len(s.tokens) == 12 for s in free)
    stop = free[0].tokens[3]
    cut = sampler.generate(PROMPTS, SamplingConfig(12, greedy=True, extra_stop_ids=(stop,)))
    first = free[0].tokens.index(stop)
    assert cut[0].tokens == free[0].tokens[:first + 1] and cut[0].stop_reason == "stop_token"
    for full, short in zip(free, cut):  # every row stops at its first stop token, or runs to the limit
        k = full.tokens.index(stop) + 1 if stop in full.tokens else len(full.tokens)
        assert short.tokens == full.tokens[:k]


def test_bad_requests(tiny_model):
    sampler = Sampler(tiny_model, batch_size=2)
    with pytest.raises(SamplingError, match="max_new_tokens must be positive"):
        sampler.generate(PROMPTS, SamplingConfig(0))
    with pytest.raises(SamplingError, match="a prompt has no tokens"):
        sampler.generate([[2, 3], []], SamplingConfig(4))
    with pytest.raises(SamplingError, match="prompt 0 has 1030 tokens.*context of 1024"):
        sampler.generate([[2] * 1030], SamplingConfig(4))
    with pytest.raises(SamplingError, match="temperature must be positive"):
        sampler.generate(PROMPTS, SamplingConfig(4, temperature=0.0))
    with pytest.raises(SamplingError, match="top_p must be in"):
        sampler.generate(PROMPTS, SamplingConfig(4, top_p=0.0))
    with pytest.raises(SamplingError, match="no prompts"):
        sampler.generate([], SamplingConfig(4))


def test_greedy_choice_is_first_maximum_with_exact_logprob():
    """Ties resolve to the lowest id, as numpy's argmax; the log-prob is the untempered log-softmax."""
    from kwjax.sampling import choose

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[1, [7, 30]] = logits[1].max() + 1.0  # a tie for the maximum
    logits[2, :] = 0.5  # all tied
    logits[3, 49] = 100.0  # the maximum at the last id
    token, logp = choose(jnp.asarray(logits), jax.random.split(jax.random.PRNGKey(0), 6),
                         SamplingConfig(greedy=True, temperature=0.3))
    want_tok = np.argmax(logits, axis=-1)
    x = logits.astype(np.float64)
    log_softmax = x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    np.testing.assert_array_equal(np.asarray(token), want_tok)
    assert want_tok[1] == 7 and want_tok[2] == 0 and want_tok[3] == 49
    chex.assert_trees_all_close(np.asarray(logp, np.float64), log_softmax[np.arange(6), want_tok], atol=1e-5)


def test_first_max_across_blocks_matches_numpy_argmax():
    """1300 ids (three blocks of 512, the last padded): ties inside a block, across blocks, at the
    last id, an all-equal row and an all -inf row give numpy's first index of the maximum."""
    from kwjax.sampling import first_max

    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 1300)).astype(np.float32)
    x[0, [700, 1200]] = 9.0  # tie across blocks: the earlier one
    x[1, [513, 600]] = 9.0  # tie inside the second block
    x[2, 1299] = 9.0  # the last real id, beside the padding
    x[3, :] = -1.5
    x[4, :] = -np.inf
    token, top = first_max(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(token), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(np.asarray(top)[:, 0], x.max(axis=-1))
