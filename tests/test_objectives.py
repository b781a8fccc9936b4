"""The objective registry, and the reference-free SimPO and ORPO losses against float64 numpy.

Expected values come from numpy code written here or from numbers worked out by hand: SimPO (Meng et al.
2024) −(1−ε)·logσ(β(a_c − a_r) − γ) − ε·logσ(−…), ORPO (Hong et al. 2024) NLL(chosen) +
λ·(−logσ(log odds_c − log odds_r)), with a = length-averaged log-prob and log odds = a − log(1 − e^a).
"""

from __future__ import annotations

import math
import pathlib
import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwjax import losses, objectives
from tests.conftest import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_log1mexp(a):
    """log(1 − e^a) in float64, for a < 0. Each side of −ln 2 uses the form without cancellation there
    (near 0, 1 − e^a cancels; far below, log of a number next to 1 loses e^a); in float64 either is
    far more accurate than the float32 under test."""
    a = np.asarray(a, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(a > -math.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))


def np_pair_metrics(rew_c, rew_r, pc, pr, m, n):
    mean = lambda x: float((x * m).sum() / n)  # noqa: E731
    return {"rewards/chosen": mean(rew_c), "rewards/rejected": mean(rew_r), "rewards/margins": mean(rew_c - rew_r),
            "rewards/accuracies": mean((rew_c > rew_r).astype(np.float64)), "logps/chosen": mean(pc),
            "logps/rejected": mean(pr)}


def np_simpo(pc, pr, tc, tr, mask, n, *, beta, gamma, eps=0.0):
    pc, pr, tc, tr, m = (np.asarray(x, np.float64) for x in (pc, pr, tc, tr, mask))
    rew_c, rew_r = beta * pc / tc, beta * pr / tr
    z = rew_c - rew_r - gamma
    per = -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
    loss = float((per * m).sum() / n)
    return loss, {"loss": loss, **np_pair_metrics(rew_c, rew_r, pc, pr, m, n)}


def np_orpo(pc, pr, tc, tr, mask, n, n_chosen_tokens, *, beta, cap=-1e-6):
    pc, pr, tc, tr, m = (np.asarray(x, np.float64) for x in (pc, pr, tc, tr, mask))
    a_c, a_r = np.minimum(pc / tc, cap), np.minimum(pr / tr, cap)
    log_odds = (a_c - a_r) - (np_log1mexp(a_c) - np_log1mexp(a_r))
    nll = float(-(pc * m).sum() / n_chosen_tokens)
    or_loss = float(-beta * (np_log_sigmoid(log_odds) * m).sum() / n)
    metrics = {"loss": nll + or_loss, "nll_loss": nll, "or_loss": or_loss,
               "log_odds_ratio": float((np_log_sigmoid(log_odds) * m).sum() / n),
               "log_odds_chosen": float((log_odds * m).sum() / n),
               **np_pair_metrics(beta * pc / tc, beta * pr / tr, pc, pr, m, n)}
    return nll + or_loss, metrics


def assert_metrics_close(got: dict, want: dict, rtol=1e-5, atol=1e-6):
    assert set(want) <= set(got), f"missing metrics: {set(want) - set(got)}"
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=rtol, atol=atol, err_msg=k)


def random_pairs(seed=0, n=9):
    """Summed log-probs and token counts of n pairs; the last two are padding with garbage values."""
    rng = np.random.default_rng(seed)
    tc = rng.integers(3, 60, n).astype(np.float32)
    tr = rng.integers(3, 60, n).astype(np.float32)
    pc = (tc * rng.uniform(-3.0, -0.05, n)).astype(np.float32)
    pr = (tr * rng.uniform(-3.0, -0.05, n)).astype(np.float32)
    pc[0], tc[0], pr[0], tr[0] = -6.0, 3.0, -8.0, 4.0  # a tie in averaged log-probs: not accurate
    mask = np.ones(n, np.float32)
    mask[-2:] = 0
    pc[-1], pr[-2] = 0.0, -1e4
    return pc, pr, tc, tr, mask


# ---------------------------------------------------------------------------------------------------
# SimPO and ORPO against numpy.


@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("n_pairs", [None, 12.0])  # None: this batch's pairs; 12: a larger step total
def test_simpo_matches_numpy(eps, n_pairs):
    pc, pr, tc, tr, mask = random_pairs()
    n = float(mask.sum()) if n_pairs is None else n_pairs
    loss, m = losses.simpo_loss(pc, pr, tc, tr, mask, n, beta=2.0, gamma=0.5, label_smoothing=eps)
    want_loss, want = np_simpo(pc, pr, tc, tr, mask, n, beta=2.0, gamma=0.5, eps=eps)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(m, want)
    assert 0.0 < want["rewards/accuracies"] < 7.0 / n  # the tie is not counted; some pairs are wrong
    chex.assert_tree_all_finite(m)


@pytest.mark.parametrize("n_pairs", [None, 12.0])
def test_orpo_matches_numpy(n_pairs):
    pc, pr, tc, tr, mask = random_pairs(seed=1)
    n = float(mask.sum()) if n_pairs is None else n_pairs
    n_tok = float((tc * mask).sum()) + 5.0  # the step's chosen tokens may exceed this micro-batch's
    loss, m = losses.orpo_loss(pc, pr, tc, tr, mask, n, n_tok, beta=0.25)
    want_loss, want = np_orpo(pc, pr, tc, tr, mask, n, n_tok, beta=0.25)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(m, want)
    assert want["or_loss"] > 0.01 and want["nll_loss"] > 0.1  # both terms matter here


@pytest.mark.parametrize("a_c,a_r", [(-1e-9, -0.3), (-0.3, -1e-9), (-1e-9, -1e-9), (-50.0, -1e-9),
                                     (-1e-9, -50.0), (-50.0, -60.0), (0.0, -2.0)])
def test_orpo_finite_at_the_extremes(a_c, a_r):
    t = np.array([4.0, 7.0], np.float32)
    pc, pr = np.float32(a_c) * t, np.float32(a_r) * t
    mask = np.ones(2, np.float32)

    def f(pc, pr):
        return losses.orpo_loss(pc, pr, t, t, mask, 2.0, float(t.sum()), beta=0.5)

    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pc, pr)
    chex.assert_tree_all_finite((loss, m, grads))
    want_loss, want = np_orpo(pc, pr, t, t, mask, 2.0, float(t.sum()), beta=0.5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(m, want, rtol=1e-4)


def test_log1mexp_accurate_over_the_range():
    a = -np.r_[np.geomspace(1e-6, 80.0, 400), math.log(2.0), np.nextafter(np.float32(math.log(2.0)), 1)]
    got = np.asarray(losses.log1mexp(jnp.asarray(a, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, np_log1mexp(a.astype(np.float32)), rtol=2e-6, atol=1e-30)


def test_simpo_by_hand():
    one = lambda v: np.array([v], np.float32)  # noqa: E731
    # a_c = a_r, γ = 0: logσ(0) -> ln 2; rewards equal, so accuracy 0.
    loss, m = losses.simpo_loss(one(-6.0), one(-4.0), one(3.0), one(2.0), one(1.0), 1.0, beta=2.0, gamma=0.0)
    np.testing.assert_allclose(float(loss), LN2, rtol=1e-6)
    assert float(m["rewards/accuracies"]) == 0.0 and float(m["rewards/margins"]) == 0.0
    # a_c = −1, a_r = −2, β = 2, γ = 0.5: z = 2·1 − 0.5 = 1.5, loss = log(1 + e^−1.5) = 0.2014132779827524.
    loss, m = losses.simpo_loss(one(-3.0), one(-10.0), one(3.0), one(5.0), one(1.0), 1.0, beta=2.0, gamma=0.5)
    np.testing.assert_allclose(float(loss), 0.2014132779827524, rtol=1e-6)
    np.testing.assert_allclose([float(m["rewards/chosen"]), float(m["rewards/rejected"])], [-2.0, -4.0], rtol=1e-6)
    assert float(m["rewards/accuracies"]) == 1.0 and float(m["logps/chosen"]) == -3.0


def test_orpo_by_hand():
    # Chosen: 2 tokens, average probability 1/2 (odds 1); rejected: average probability 1/5 (odds 1/4).
    # Log odds ratio = ln 4, −logσ(ln 4) = ln(1 + 1/4); NLL = mean chosen token NLL = ln 2.
    one = lambda v: np.array([v], np.float32)  # noqa: E731
    pc, pr = one(2 * math.log(0.5)), one(3 * math.log(0.2))
    loss, m = losses.orpo_loss(pc, pr, one(2.0), one(3.0), one(1.0), 1.0, 2.0, beta=0.1)
    np.testing.assert_allclose(float(m["nll_loss"]), LN2, rtol=1e-6)
    np.testing.assert_allclose(float(m["log_odds_chosen"]), math.log(4.0), rtol=1e-5)
    np.testing.assert_allclose(float(loss), LN2 + 0.1 * math.log(1.25), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The registry.


def config(**dpo):
    c = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    for k, v in dpo.items():
        c.dpo[k] = v
    return c


def test_get_picks_the_entry():
    assert objectives.get("sft", config()) is objectives.REGISTRY["sft"]
    assert objectives.get("sft", config()).data == "sft"
    for name in ("sigmoid", "ipo", "hinge", "simpo", "orpo"):
        o = objectives.get("dpo", config(loss_type=name))
        assert o.name == name and o.data == "pairs"
        assert o.needs_reference == (name in ("sigmoid", "ipo", "hinge"))
    assert objectives.PREFERENCE_LOSSES == ("sigmoid", "ipo", "hinge", "simpo", "orpo") == losses.LOSS_TYPES
    assert objectives.get("dpo", config()).name == "sigmoid"  # the shipped default


def test_get_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"dpo\.loss_type is 'kto'.*simpo"):
        objectives.get("dpo", config(loss_type="kto"))
    with pytest.raises(ValueError, match="method is 'ppo'"):
        objectives.get("ppo", config())


def test_shipped_config_has_simpo_gamma():
    for name in ("experiment", "quick", "tiny"):
        c = runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()
        assert c.dpo.simpo_gamma == 0.5 and c.dpo.beta == 0.1


# ---------------------------------------------------------------------------------------------------
# Entries' loss functions on a random batch: 4 pairs (the last one padding), rows chosen then rejected.


def random_batch(seed=0, pairs=4, R=12):
    rng = np.random.default_rng(seed)
    b = 2 * pairs
    lengths = rng.integers(2, R + 1, b)
    lengths[[pairs - 1, b - 1]] = 0  # a padded pair: no response tokens
    mask_BR = np.arange(R)[None, :] < lengths[:, None]
    token_logps_BR = np.where(mask_BR, rng.uniform(-4.0, -0.01, (b, R)), 0.0).astype(np.float32)
    num_tokens_B = mask_BR.sum(-1).astype(np.float32)
    mean_logit_B = np.where(num_tokens_B > 0, rng.normal(0, 3, b), 0.0).astype(np.float32)
    lp = losses.ResponseLogps(jnp.asarray(token_logps_BR), jnp.asarray(token_logps_BR.sum(-1)),
                              jnp.asarray(num_tokens_B), jnp.asarray(mean_logit_B))
    example_mask_B = np.ones(b, bool)
    example_mask_B[[pairs - 1, b - 1]] = False
    batch = {"target_mask_BR": mask_BR, "example_mask_B": example_mask_B,
             "ref_logps_B": (token_logps_BR.sum(-1) + rng.normal(0, 2, b) * (num_tokens_B > 0)).astype(np.float32)}
    return lp, batch


def halves(x):
    x = np.asarray(x)
    return x[: len(x) // 2], x[len(x) // 2:]


def assert_pair_extras(m, lp, batch, n_pairs):
    """logits/* and num_tokens, computed by hand (float64)."""
    pair_mask = halves(batch["example_mask_B"])[0].astype(np.float64)
    lc, lr = halves(np.asarray(lp.mean_logit_B, np.float64))
    tc, tr = halves(np.asarray(lp.num_tokens_B, np.float64))
    np.testing.assert_allclose(float(m["logits/chosen"]), (lc * pair_mask).sum() / n_pairs, rtol=1e-6)
    np.testing.assert_allclose(float(m["logits/rejected"]), (lr * pair_mask).sum() / n_pairs, rtol=1e-6)
    assert float(m["num_tokens"]) == ((tc + tr) * pair_mask).sum()
    pc, pr = halves(np.asarray(lp.logps_B, np.float64))
    wins = [float(c / max(a, 1.0) > r / max(b, 1.0)) for c, r, a, b in zip(pc, pr, tc, tr)]
    np.testing.assert_allclose(float(m["preference_accuracy"]), (np.array(wins) * pair_mask).sum() / n_pairs,
                               rtol=1e-6)


def test_totals_count_real_pairs_and_chosen_tokens():
    lp, batch = random_batch()
    t = objectives.totals(objectives.REGISTRY["simpo"], batch)
    assert float(t["pairs"]) == 3.0
    assert float(t["chosen_tokens"]) == halves(batch["target_mask_BR"])[0].sum()
    assert float(objectives.totals(objectives.REGISTRY["sft"], batch)["tokens"]) == batch["target_mask_BR"].sum()
    empty = {"target_mask_BR": np.zeros((4, 3), bool), "example_mask_B": np.zeros(4, bool)}
    assert float(objectives.totals(objectives.REGISTRY["orpo"], empty)["pairs"]) == 1.0  # never 0


def test_sft_entry_is_sft_loss():
    lp, batch = random_batch()
    t = objectives.totals(objectives.REGISTRY["sft"], batch)
    got = objectives.REGISTRY["sft"].loss(lp, None, batch, t, config())
    want = losses.sft_loss(lp, batch["example_mask_B"], t["tokens"])
    chex.assert_trees_all_equal(got, want)
    mask_B = batch["example_mask_B"]
    np.testing.assert_allclose(float(got[0]), -np.asarray(lp.logps_B, np.float64)[mask_B].sum()
                               / batch["target_mask_BR"].sum(), rtol=1e-6)


@pytest.mark.parametrize("loss_type,eps,alpha", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.5), ("ipo", 0.0, 0.3),
                                                 ("hinge", 0.0, 0.0)])
def test_dpo_entries_are_dpo_loss(loss_type, eps, alpha):
    lp, batch = random_batch(seed=2)
    cfg = config(loss_type=loss_type, label_smoothing=eps, rpo_alpha=alpha, beta=0.2)
    o = objectives.get("dpo", cfg)
    t = objectives.totals(o, batch)
    loss, m = o.loss(lp, jnp.asarray(batch["ref_logps_B"]), batch, t, cfg)
    pc, pr = halves(lp.logps_B)
    rc, rr = halves(batch["ref_logps_B"])
    tc, tr = halves(lp.num_tokens_B)
    want_loss, want = losses.dpo_loss(
        pc, pr, rc, rr, halves(batch["example_mask_B"])[0], t["pairs"], beta=0.2, loss_type=loss_type,
        label_smoothing=eps, chosen_tokens_B=np.maximum(tc, 1.0), rejected_tokens_B=np.maximum(tr, 1.0),
        rpo_alpha=alpha, chosen_nll_sum_B=-pc, num_chosen_tokens_total=t["chosen_tokens"])
    chex.assert_trees_all_equal(loss, want_loss)  # bit-identical
    chex.assert_trees_all_equal({k: m[k] for k in want}, want)
    assert set(m) == set(want) | {"logits/chosen", "logits/rejected", "num_tokens", "preference_accuracy"}
    assert_pair_extras(m, lp, batch, 3.0)
    if loss_type == "sigmoid" and not eps:
        assert abs(float(loss) - LN2) > 1e-3  # the reference differs from the policy here


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_entries(name):
    lp, batch = random_batch(seed=3)
    cfg = config(loss_type=name, beta=2.0 if name == "simpo" else 0.1, label_smoothing=0.05, simpo_gamma=0.7)
    o = objectives.get("dpo", cfg)
    t = objectives.totals(o, batch)
    loss, m = o.loss(lp, None, {k: v for k, v in batch.items() if k != "ref_logps_B"}, t, cfg)
    pc, pr = halves(lp.logps_B)
    tc, tr = (np.maximum(x, 1.0) for x in halves(lp.num_tokens_B))
    mask = halves(batch["example_mask_B"])[0]
    if name == "simpo":
        want_loss, want = np_simpo(pc, pr, tc, tr, mask, 3.0, beta=2.0, gamma=0.7, eps=0.05)
    else:
        want_loss, want = np_orpo(pc, pr, tc, tr, mask, 3.0, float(t["chosen_tokens"]), beta=0.1)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert_metrics_close(m, want)
    assert_pair_extras(m, lp, batch, 3.0)
    chex.assert_tree_all_finite(m)  # the padded pair (no tokens, log-prob 0) included


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_accumulated_micro_batches_equal_the_full_batch(name):
    """Two micro-batches (each pair's chosen and rejected rows kept together), normalised by the full
    batch's totals, sum to the full batch's loss, metrics and gradient."""
    lp, batch = random_batch(seed=4, pairs=6)
    cfg = config(loss_type=name, beta=1.5)
    o = objectives.get("dpo", cfg)
    t = objectives.totals(o, batch)
    micro_rows = [np.r_[0:3, 6:9], np.r_[3:6, 9:12]]

    def loss_of(logps_B, rows):
        sub = losses.ResponseLogps(lp.token_logps_BR[rows], logps_B, lp.num_tokens_B[rows], lp.mean_logit_B[rows])
        return o.loss(sub, None, {k: v[rows] for k, v in batch.items()}, t, cfg)

    grad = jax.value_and_grad(loss_of, has_aux=True)
    (full, m_full), g_full = grad(lp.logps_B, np.arange(12))
    parts = [grad(lp.logps_B[rows], rows) for rows in micro_rows]
    np.testing.assert_allclose(sum(float(l) for (l, _), _ in parts), float(full), rtol=1e-6, atol=1e-6)
    for k in m_full:
        np.testing.assert_allclose(sum(float(m[k]) for (_, m), _ in parts), float(m_full[k]), rtol=1e-6,
                                   atol=1e-6, err_msg=k)
    g_micro = np.zeros(12, np.float32)
    for rows, (_, g) in zip(micro_rows, parts):
        g_micro[rows] = g
    np.testing.assert_allclose(g_micro, g_full, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(g_full)).max() > 1e-3


# ---- through training: reference-free objectives never run a reference pass --------------------------------


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_train_without_any_reference_pass(loss_type, tmp_path, monkeypatch):
    """SimPO and ORPO train through `kwjax.train` with neither a cached reference pass nor a reference
    tree; the first step's loss is the paper's formula on the starting model's log-probs (numpy)."""
    from kwjax import reference, stages
    from kwjax import step as steplib
    from kwjax import train as T
    from kwjax.prepare import prepare

    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference pass ran")

    monkeypatch.setattr(reference, "reference_logps", no_reference)
    for where in ("precomputed", "on_the_fly"):
        cfg = tiny_config(max_steps=2, **{"dpo.loss_type": loss_type, "dpo.beta": 2.0 if loss_type == "simpo"
                                           else 0.1, "dpo.reference": where})
        run = prepare(cfg, "dpo", stages.load_model(cfg))
        assert run.ref is None and run.ref_logps == {} and not run.objective.needs_reference
    batch, module = run.train_batch(0), run.module
    lp = jax.jit(lambda p, b: steplib.forward_logps(module, p, b, cfg.logprob_chunk))(run.params(), batch)
    logps, counts = np.asarray(lp.logps_B, np.float64), np.asarray(lp.num_tokens_B, np.float64)
    mask = np.asarray(batch["example_mask_B"])
    half = len(logps) // 2
    a_c, a_r = logps[:half] / counts[:half], logps[half:] / counts[half:]
    keep = mask[:half]
    if loss_type == "simpo":
        z = 2.0 * (a_c - a_r) - cfg.dpo.simpo_gamma
        want = np.mean(np.log1p(np.exp(-z))[keep])
    else:
        log_odds = (a_c - np.log1p(-np.exp(a_c))) - (a_r - np.log1p(-np.exp(a_r)))
        nll = -logps[:half][keep].sum() / counts[:half][keep].sum()
        want = nll + 0.1 * np.mean(np.log1p(np.exp(-log_odds))[keep])
    del run, lp

    result = T.train(cfg, "dpo", tmp_path / "run", stages.load_model(cfg), progress=False)
    first = [m for m in result.metrics if "loss" in m][0]
    assert abs(first["loss"] - want) < 1e-5 * max(1.0, abs(want)), (first["loss"], want)
    assert all(np.isfinite(m["loss"]) for m in result.metrics if "loss" in m)
    assert any("eval_loss" in m for m in result.metrics)
    assert not (tmp_path / "cache" / "reference_logps").exists()
