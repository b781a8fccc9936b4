"""Response log-probs, SFT and DPO-family losses against independent float64 references.

Every expected value here comes from numpy float64 code written in this file (or from a number worked
out by hand), never from kwjax itself. Formulas follow /work/shared/conventions.md: sequence log-prob
= sum of response-token log-probs; SFT = mean token NLL; DPO sigmoid with cDPO smoothing, IPO on
length-averaged log-probs, hinge, RPO = DPO + α·NLL(chosen); TRL metric names.
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

import kwjax
from kwjax import batching, losses
from kwjax.batching import Sequence_
from tests.conftest import ENGLISH, KOREAN, hf_logits, random_logps_inputs

REPO = pathlib.Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------
# Independent references (numpy, float64).


def np_logsumexp(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def np_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)  # log σ(x) = −log(1 + e^{−x}), stable for both signs


def np_response_logps(hidden, emb, idx, tgt, mask, softcap=None):
    """(token_logps [B,R], logps [B], num_tokens [B], mean_logit [B]) in float64."""
    h = np.asarray(hidden, np.float64)
    e = np.asarray(emb, np.float64)
    b, r = idx.shape
    token = np.zeros((b, r))
    mean_logit = np.zeros(b)
    count = np.asarray(mask, np.float64).sum(-1)
    for i in range(b):
        total = 0.0
        for j in range(r):
            if not mask[i, j]:
                continue
            logits = e @ h[i, idx[i, j]]  # [V]
            if softcap:
                logits = np.tanh(logits / softcap) * softcap
            token[i, j] = logits[tgt[i, j]] - np_logsumexp(logits)
            total += logits.mean()
        mean_logit[i] = total / count[i] if count[i] else 0.0
    return token, token.sum(-1), count, mean_logit


def np_grads_of_sum_logps(hidden, emb, idx, tgt, mask):
    """Analytic d(Σ_b logps_b)/d(hidden, embedding): dlogits = mask·(onehot − softmax)."""
    h = np.asarray(hidden, np.float64)
    e = np.asarray(emb, np.float64)
    dh = np.zeros_like(h)
    de = np.zeros_like(e)
    b, r = idx.shape
    for i in range(b):
        for j in range(r):
            if not mask[i, j]:
                continue
            x = h[i, idx[i, j]]
            logits = e @ x
            p = np.exp(logits - np_logsumexp(logits))
            g = -p
            g[tgt[i, j]] += 1.0
            dh[i, idx[i, j]] += e.T @ g
            de += np.outer(g, x)
    return dh, de


def np_dpo(pc, pr, rc, rr, mask, n_pairs, *, beta, loss_type="sigmoid", eps=0.0, tc=None, tr=None,
           rpo_alpha=0.0, chosen_nll=None, n_chosen_tokens=None):
    """(loss, metrics) from the conventions file, in float64, pairs with mask 0 left out."""
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    m = np.asarray(mask, np.float64)
    r_c, r_r = pc - rc, pr - rr
    if loss_type == "sigmoid":
        d = r_c - r_r
        per = -(1 - eps) * np_log_sigmoid(beta * d) - eps * np_log_sigmoid(-beta * d)
    elif loss_type == "ipo":
        d = r_c / np.asarray(tc, np.float64) - r_r / np.asarray(tr, np.float64)
        per = (d - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        per = np.maximum(0.0, 1.0 - beta * (r_c - r_r))
    else:
        raise AssertionError(loss_type)
    dpo = float((per * m).sum() / n_pairs)
    loss = dpo + (rpo_alpha * float((np.asarray(chosen_nll, np.float64) * m).sum() / n_chosen_tokens)
                  if rpo_alpha else 0.0)
    mean = lambda x: float((x * m).sum() / n_pairs)  # noqa: E731
    metrics = {
        "loss": loss,
        "dpo_loss": dpo,
        "rewards/chosen": mean(beta * r_c),
        "rewards/rejected": mean(beta * r_r),
        "rewards/margins": mean(beta * r_c - beta * r_r),
        "rewards/accuracies": mean((beta * r_c > beta * r_r).astype(np.float64)),
        "logps/chosen": mean(pc),
        "logps/rejected": mean(pr),
    }
    return loss, metrics


def assert_metrics_close(got: dict, want: dict, atol=1e-5, rtol=1e-5):
    assert set(want) <= set(got), f"missing metrics: {set(want) - set(got)}"
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, atol=atol, rtol=rtol, err_msg=k)


# ---------------------------------------------------------------------------------------------------
# 1. response_logps


@pytest.fixture(scope="module")
def logps_case():
    rng = np.random.default_rng(0)
    V = 50
    hidden, emb, idx, tgt, mask = random_logps_inputs(rng, B=4, T=12, D=16, V=V, R=7, emb_scale=0.5)
    mask[1, 4:] = False  # right padding
    mask[2, 1] = mask[2, 5:] = False  # a hole and padding
    mask[3] = False  # a fully masked row (a padded example)
    tgt[~mask] = rng.integers(0, V, size=(~mask).sum())  # garbage under the mask must not count
    return hidden, emb, idx, tgt, mask


@pytest.mark.parametrize("chunk", [1, 3, 7, 4, 64])  # 7 = R, 4 does not divide R = 7, 64 > R
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_response_logps_matches_numpy(logps_case, chunk, softcap):
    hidden, emb, idx, tgt, mask = logps_case
    got = losses.response_logps(hidden, emb, idx, tgt, mask, chunk=chunk, softcap=softcap)
    tok, seq, count, mean_logit = np_response_logps(hidden, emb, idx, tgt, mask, softcap)
    assert got.token_logps_BR.shape == mask.shape
    chex.assert_trees_all_close(np.asarray(got.token_logps_BR, np.float64), tok, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(got.logps_B, np.float64), seq, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.num_tokens_B), [7, 4, 4, 0])
    np.testing.assert_array_equal(np.asarray(got.num_tokens_B), count)
    chex.assert_trees_all_close(np.asarray(got.mean_logit_B, np.float64), mean_logit, atol=2e-5, rtol=1e-5)
    # Masked positions are exactly 0; the fully masked row contributes nothing and stays finite.
    assert np.all(np.asarray(got.token_logps_BR)[~mask] == 0.0)
    assert float(got.logps_B[3]) == 0.0 and float(got.mean_logit_B[3]) == 0.0
    assert np.all(np.asarray(got.logps_B[:3]) < 0)


def test_response_logps_chunk_sizes_agree(logps_case):
    hidden, emb, idx, tgt, mask = logps_case
    outs = [losses.response_logps(hidden, emb, idx, tgt, mask, chunk=c) for c in (1, 3, 4, 7, 64)]
    for other in outs[1:]:
        chex.assert_trees_all_close(tuple(other), tuple(outs[0]), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_response_logps_gradients(logps_case, chunk):
    hidden, emb, idx, tgt, mask = logps_case

    def chunked(h, e):
        return losses.response_logps(h, e, idx, tgt, mask, chunk=chunk).logps_B.sum()

    def plain(h, e):  # unchunked, no remat: the obvious implementation
        h_brd = jnp.take_along_axis(h, jnp.asarray(idx)[..., None], axis=1)
        logp = jax.nn.log_softmax(jnp.einsum("brd,vd->brv", h_brd, e), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], axis=-1)[..., 0]
        return jnp.sum(picked * mask)

    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, emb)
    g_plain = jax.grad(plain, argnums=(0, 1))(hidden, emb)
    chex.assert_trees_all_close(g_chunk, g_plain, atol=1e-5, rtol=1e-5)
    dh, de = np_grads_of_sum_logps(hidden, emb, idx, tgt, mask)  # and both against the analytic form
    chex.assert_trees_all_close(tuple(np.asarray(g, np.float64) for g in g_chunk), (dh, de),
                                atol=5e-5, rtol=1e-4)
    assert np.abs(de).max() > 1e-2  # the gradient is not trivially zero
    np.testing.assert_array_equal(np.asarray(g_chunk[0])[3], 0.0)  # fully masked row: no gradient


# ---------------------------------------------------------------------------------------------------
# 2. SFT


def test_sft_loss_by_hand():
    token = np.array([[-1.0, -2.0, 0.0],
                      [-0.5, 0.0, 0.0],
                      [-3.0, -4.0, 0.0]], np.float32)  # row 2 is a padded example: must not count
    count = np.array([2.0, 1.0, 2.0], np.float32)
    lp = losses.ResponseLogps(jnp.asarray(token), jnp.asarray(token.sum(-1)), jnp.asarray(count),
                              jnp.zeros(3))
    example_mask = np.array([True, True, False])
    loss, metrics = losses.sft_loss(lp, example_mask, 3.0)  # 3 valid tokens in the real rows
    expected = (1.0 + 2.0 + 0.5) / 3.0  # = 7/6
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-6)
    assert float(metrics["num_tokens"]) == 3.0
    # Normaliser is the step's total (micro-batches add up): half a step gives half the loss.
    np.testing.assert_allclose(float(losses.sft_loss(lp, example_mask, 6.0)[0]), expected / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 3. DPO family


def test_dpo_sigmoid_by_hand():
    beta = 0.1
    # pair 0: Δ = 0 -> ln 2; pair 1: r_c = 2, r_r = −2, Δ = 4 -> log(1 + e^{−0.4}); pair 2 padded (garbage).
    pc = np.array([-10.0, -10.0, 50.0], np.float32)
    rc = np.array([-10.0, -12.0, -99.0], np.float32)
    pr = np.array([-12.0, -15.0, -70.0], np.float32)
    rr = np.array([-12.0, -13.0, 3.0], np.float32)
    mask = np.array([1, 1, 0], np.float32)
    loss, m = losses.dpo_loss(pc, pr, rc, rr, mask, 2.0, beta=beta)
    pair1 = math.log1p(math.exp(-0.4))  # 0.5130152…
    assert abs(pair1 - 0.513015) < 1e-6
    np.testing.assert_allclose(float(loss), (LN2 + pair1) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/chosen"]), (0.0 + 0.2) / 2, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/rejected"]), (0.0 - 0.2) / 2, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/margins"]), 0.4 / 2, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/accuracies"]), 0.5, atol=1e-7)  # the tie is not a win
    np.testing.assert_allclose(float(m["logps/chosen"]), -10.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["logps/rejected"]), -13.5, rtol=1e-6)
    # One pair with Δ = 0 alone: exactly ln 2.
    single, _ = losses.dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], mask[:1], 1.0, beta=beta)
    np.testing.assert_allclose(float(single), LN2, atol=1e-6)


def _random_pairs(seed=0, n=6):
    rng = np.random.default_rng(seed)
    pc, pr = (rng.uniform(-80, -20, n).astype(np.float32) for _ in range(2))
    rc, rr = (x + rng.normal(0, 4, n).astype(np.float32) for x in (pc, pr))
    # pair 0: a tie in rewards (r_c = r_r = 1 exactly): not counted as accurate.
    pc[0], rc[0], pr[0], rr[0] = -5.0, -6.0, -7.0, -8.0
    tc = rng.integers(5, 60, n).astype(np.float32)
    tr = rng.integers(5, 60, n).astype(np.float32)
    mask = np.ones(n, np.float32)
    mask[-2:] = 0  # two padded pairs, with their own (garbage) values
    pc[-1], rr[-2] = 1e3, -1e3
    return pc, pr, rc, rr, tc, tr, mask


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("n_pairs", [None, 10.0])  # None: this batch's pairs; 10: a larger step total
def test_dpo_losses_and_metrics_match_numpy(loss_type, eps, n_pairs):
    pc, pr, rc, rr, tc, tr, mask = _random_pairs()
    n = float(mask.sum()) if n_pairs is None else n_pairs
    beta = 0.1 if loss_type != "hinge" else 0.05
    loss, m = losses.dpo_loss(pc, pr, rc, rr, mask, n, beta=beta, loss_type=loss_type, label_smoothing=eps,
                              chosen_tokens_B=tc, rejected_tokens_B=tr)
    want_loss, want = np_dpo(pc, pr, rc, rr, mask, n, beta=beta, loss_type=loss_type, eps=eps, tc=tc, tr=tr)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(m, want)


def test_hinge_is_zero_beyond_margin():
    pc, pr, rc, rr = (np.array([v], np.float32) for v in (-10.0, -30.0, -20.0, -20.0))  # Δ = 20
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, np.ones(1), 1.0, beta=0.1, loss_type="hinge")  # 1 − 2 < 0
    assert float(loss) == 0.0
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, np.ones(1), 1.0, beta=0.025, loss_type="hinge")  # 1 − 0.5
    np.testing.assert_allclose(float(loss), 0.5, rtol=1e-6)


def test_ipo_by_hand():
    # r_c = 10 over 5 tokens = 2, r_r = −6 over 3 tokens = −2: Δ̄ = 4; β = 0.25 -> (4 − 2)² = 4.
    one = lambda v: np.array([v], np.float32)  # noqa: E731
    loss, _ = losses.dpo_loss(one(-20.0), one(-36.0), one(-30.0), one(-30.0), np.ones(1), 1.0, beta=0.25,
                              loss_type="ipo", chosen_tokens_B=one(5.0), rejected_tokens_B=one(3.0))
    np.testing.assert_allclose(float(loss), 4.0, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_adds_chosen_nll(loss_type):
    pc, pr, rc, rr, tc, tr, mask = _random_pairs(seed=1)
    alpha, n, n_tokens = 0.7, float(mask.sum()), float((tc * mask).sum())
    nll = -pc
    loss, m = losses.dpo_loss(pc, pr, rc, rr, mask, n, beta=0.1, loss_type=loss_type,
                              chosen_tokens_B=tc, rejected_tokens_B=tr, rpo_alpha=alpha,
                              chosen_nll_sum_B=nll, num_chosen_tokens_total=n_tokens)
    want_loss, want = np_dpo(pc, pr, rc, rr, mask, n, beta=0.1, loss_type=loss_type, tc=tc, tr=tr,
                             rpo_alpha=alpha, chosen_nll=nll, n_chosen_tokens=n_tokens)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert_metrics_close(m, want)
    # RPO term by hand: α · mean token NLL of the real chosen responses.
    rpo_term = alpha * float(-(pc[mask > 0]).astype(np.float64).sum()) / n_tokens
    np.testing.assert_allclose(float(loss) - float(m["dpo_loss"]), rpo_term, rtol=1e-5)
    assert rpo_term > 0.1


def test_unknown_loss_type():
    x = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(x, x, x, x, np.ones(2), 2.0, beta=0.1, loss_type="kto")


# ---------------------------------------------------------------------------------------------------
# 4. DPO at step 0 through the real loss function: policy = reference.


def test_dpo_step0_is_ln2_through_make_loss_fn():
    from kwjax import objectives, step

    cfg = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    assert cfg.dpo.loss_type == "sigmoid" and cfg.dpo.rpo_alpha == 0.0 and cfg.dpo.label_smoothing == 0.0
    model_cfg = kwjax.models.gemma3.config.tiny(vocab_size=300)
    params = kwjax.models.gemma3.model.init_params(model_cfg, jax.random.PRNGKey(0))
    module = kwjax.models.gemma3.model.Gemma3(model_cfg)
    pairs = [
        (Sequence_(prompt=(2, 105, 20, 21, 22, 106, 107, 105, 30, 107), response=(40, 41, 42, 106)),
         Sequence_(prompt=(2, 105, 20, 21, 22, 106, 107, 105, 30, 107), response=(50, 106))),
        (Sequence_(prompt=(2, 105, 60, 106, 107, 105, 30, 107), response=(70, 71, 106)),
         Sequence_(prompt=(2, 105, 60, 106, 107, 105, 30, 107), response=(80, 81, 82, 83, 84, 85, 106))),
    ]
    batch = batching.collate_pairs(pairs, bucket=8, rows=3)  # one padded pair
    totals = objectives.totals(objectives.get("dpo", cfg), batch)
    assert float(totals["pairs"]) == 2.0
    loss_fn = jax.jit(step.make_loss_fn(module, "dpo", cfg))
    loss, m = loss_fn(params, batch, params, totals)
    assert abs(float(loss) - LN2) <= 1e-6, float(loss)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m[k])) <= 1e-7, (k, float(m[k]))
    assert float(m["rewards/accuracies"]) == 0.0
    assert float(m["logps/chosen"]) < 0 and float(m["logps/rejected"]) < 0
    assert float(m["num_tokens"]) == 4 + 2 + 3 + 7
    # Guard: the same batch with a different reference must move off ln 2.
    other = jax.tree.map(lambda x: x * 1.05, params)
    moved, _ = loss_fn(params, batch, other, totals)
    assert abs(float(moved) - LN2) > 1e-4


# ---------------------------------------------------------------------------------------------------
# 5. Real Gemma 3 270M: sequence log-probs equal transformers'.

REAL_PAIRS = [
    ("다음 단어를 모두 넣어 짧은 글을 써 줘: 골목, 노을, 호박죽", KOREAN),
    ("Write a short paragraph with the words lighthouse, gulls and lamp.", ENGLISH),
    ("한국어와 영어를 섞어서 한 문단을 써 줘.",
     "오늘 아침 coffee shop 앞에서 오래된 친구를 만났다. We talked about the rain, 그리고 "
     "어릴 적 함께 걷던 골목길 이야기를 했다. The bell above the door rang every time someone left."),
]


@pytest.mark.real_weights
def test_sequence_logps_match_transformers(real_model, hf_reference):
    from kwjax import step

    tok = real_model.tokenizer
    seqs = [batching.encode_exchange(tok, p, r) for p, r in REAL_PAIRS]
    lengths = [len(s.response) for s in seqs]
    assert all(30 <= n <= 160 for n in lengths), lengths
    batch = batching.collate(seqs, bucket=16)
    lp = step.forward_logps(real_model.module, real_model.params, batch, chunk=64)

    logits = hf_logits(hf_reference, batch["tokens_BT"].astype(np.int64), batch["valid_BT"].astype(np.int64))
    ref_tok = np.zeros(batch["targets_BR"].shape)
    for i, s in enumerate(seqs):
        p, r = len(s.prompt), len(s.response)
        row = logits[i, p - 1:p + r - 1].astype(np.float64)  # position j−1 predicts response token j
        logp = row - np_logsumexp(row)[:, None]
        ref_tok[i, :r] = logp[np.arange(r), np.asarray(s.response)]
    ref_sum = ref_tok.sum(-1)

    np.testing.assert_allclose(np.asarray(lp.token_logps_BR, np.float64), ref_tok, atol=1e-3, rtol=0)
    # Each sum adds 45–76 token log-probs (see `lengths`; ~200–280 nats in total), so abs 2e-3 on the
    # sums allows float32 error of a few 1e-5 per token (observed: max 3e-5 per token, 1e-4 on a sum).
    np.testing.assert_allclose(np.asarray(lp.logps_B, np.float64), ref_sum, atol=2e-3, rtol=0)
    np.testing.assert_array_equal(np.asarray(lp.num_tokens_B), lengths)
    assert np.all(ref_sum < -1.0)
