"""Log-probabilities of responses, and the SFT and DPO-family losses with TRL's metric names.

Notation (see shared conventions): for a pair, r_c = logπ(y_c|x) − logπ_ref(y_c|x), r_r likewise,
Δ = r_c − r_r; sequence log-probs are sums over response tokens.

Every loss returns `(total, metrics)` where `total` is a *sum* over examples (or tokens) and a
normaliser is passed in by the caller; dividing by a count fixed for the whole optimizer step is what
makes k accumulated micro-batches equal one k-times-larger batch exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

REFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # what `dpo_loss` computes (against a reference)
LOSS_TYPES = REFERENCE_LOSS_TYPES + ("simpo", "orpo")  # every valid `dpo.loss_type`


class ResponseLogps(NamedTuple):
    token_logps_BR: jax.Array  # log p(target) at each response position (0 where masked)
    logps_B: jax.Array  # sum over response tokens
    num_tokens_B: jax.Array
    mean_logit_B: jax.Array  # mean logit over vocabulary and response tokens (TRL's logits/*)


# Vocabulary entries per tile of the output projection (at most): a 262k vocabulary in 32 tiles. Small
# enough that a tile of logits for a few thousand response positions stays in the tens of MB, large
# enough that each tile's matmuls run at full speed (on XLA:CPU 8192 was as fast as 32768 and smaller).
VOCAB_CHUNK = 8192


def response_logps(hidden_BTD, embedding_VD, target_idx_BR, targets_BR, target_mask_BR, *,
                   chunk: int = 128, softcap: float | None = None, vocab_chunk: int = VOCAB_CHUNK,
                   keep_logits: bool = False) -> ResponseLogps:
    """Log-probs of response tokens, projecting only response positions onto the vocabulary, in tiles.

    The projection runs on tiles of (all rows × `chunk` response positions) × (at most `vocab_chunk`
    vocabulary entries) with an online log-sum-exp, so no pass ever holds more than one tile of float32
    logits instead of B × R × V; the backward pass recomputes each tile and writes each tile's rows of
    the embedding's gradient once (see `_tiled_logps`).

    `keep_logits` keeps every tile's logits from the forward pass for the backward pass instead of
    recomputing them: one vocabulary projection fewer per step (the largest matmul of a 270M model) for
    B × R × V float32 of memory (8 × 192 × 262k: 1.6 GB), the trade a CPU with memory to spare wants.
    """
    hidden_BRD = jnp.take_along_axis(hidden_BTD, target_idx_BR[..., None], axis=1)
    b, r, d = hidden_BRD.shape
    chunk = min(chunk, r)
    pad = -r % chunk
    # [C, B·chunk, D]: token chunk c holds response positions c·chunk … (c+1)·chunk − 1 of every row
    h = jnp.pad(hidden_BRD, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
    h = h.reshape(-1, b * chunk, d)
    t = jnp.pad(targets_BR, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1).reshape(-1, b * chunk)
    logps, mean_logits = _tiled_logps(h, embedding_VD, t, vocab_tiles(embedding_VD.shape[0], vocab_chunk), softcap,
                                     keep_logits)

    def unchunk(x):  # [C, B·chunk] -> [B, R]
        return x.reshape(-1, b, chunk).swapaxes(0, 1).reshape(b, -1)[:, :r]

    mask = target_mask_BR.astype(jnp.float32)
    token_logps = unchunk(logps) * mask
    mean_logits = unchunk(mean_logits) * mask
    count = mask.sum(-1)
    return ResponseLogps(token_logps, token_logps.sum(-1), count, mean_logits.sum(-1) / jnp.maximum(count, 1.0))


def with_row_gradients(lp: ResponseLogps, hidden_BTD, embedding_VD, ids_K, rows_KD, target_idx_BR, targets_BR,
                       target_mask_BR, *, softcap: float | None = None) -> ResponseLogps:
    """`lp`, computed with the output embedding `embedding_VD` held constant, given the gradient of each
    log p(target) with respect to a few trained rows `rows_KD` of it (ids `ids_K`); values unchanged.

    Why: letting the gradient reach K rows through the tiled projection would form the whole [V, D]
    embedding gradient first (the 270M's SFT step took 35-41 s that way against 29.7 s frozen, in
    separate runs, not side by side). Per response position n,
    d log p(t_n) / d z_nk = [t_n = k] - p_nk for the K logits z_nk = softcap(h_n · row_k), so
    f_n = sum_k ([t_n = k] - stop_grad(p_nk)) · z_nk has the same gradient in the rows, and adding
    f_n - stop_grad(f_n) (= 0) passes it on. p_nk = exp(z_nk - lse_n), lse_n = z_n,t_n - log p(t_n).
    """
    sg = jax.lax.stop_gradient
    mask = target_mask_BR.astype(bool)
    h_BRD = sg(jnp.take_along_axis(hidden_BTD, target_idx_BR[..., None], axis=1)).astype(jnp.float32)
    e_BRD = jnp.take(sg(embedding_VD), targets_BR, axis=0).astype(jnp.float32)
    z_target_BR = _softcap(jnp.sum(h_BRD * e_BRD, -1), softcap)
    lse_BR = sg(jnp.where(mask, z_target_BR - lp.token_logps_BR, 0.0))
    z_BRK = _softcap(jnp.einsum("brd,kd->brk", h_BRD, rows_KD.astype(jnp.float32)), softcap)
    p_BRK = sg(jnp.where(mask[..., None], jnp.exp(jnp.minimum(sg(z_BRK) - lse_BR[..., None], 0.0)), 0.0))
    hit_BRK = (targets_BR[..., None] == ids_K).astype(jnp.float32)
    f_BR = jnp.sum((hit_BRK - p_BRK) * z_BRK, -1)
    token = lp.token_logps_BR + jnp.where(mask, f_BR - sg(f_BR), 0.0).astype(lp.token_logps_BR.dtype)
    return ResponseLogps(token, token.sum(-1), lp.num_tokens_B, lp.mean_logit_B)


def vocab_tiles(vocab: int, vocab_chunk: int) -> int:
    """How many tiles the vocabulary is cut into: the fewest, dividing it, of at most `vocab_chunk` rows.

    Tile j holds the rows j, j + n, j + 2n, … (n tiles): the embedding seen as [V/n, n, D], sliced on its
    middle axis. A vocabulary sharded over devices in contiguous blocks (the `tensor` mesh axis) stays
    sharded in every tile, so each device projects its own part of every tile. A vocabulary without a
    divisor near the wanted size (e.g. a prime) is one tile.
    """
    n = max(1, -(-vocab // max(1, vocab_chunk)))
    while vocab % n:
        n += 1
    return n if vocab // n * 8 >= min(vocab_chunk, vocab) else 1


def _softcap(z, softcap):
    return jnp.tanh(z / softcap) * softcap if softcap else z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled_logps(h_CND, embedding_VD, targets_CN, tiles: int, softcap, keep_logits: bool = False):
    """(log p(target), mean logit over the vocabulary) per position: [C, N] each.

    h_CND: C token chunks of N positions; the logits of one (token chunk, vocabulary tile) are the only
    large array alive at a time, in the forward and in the backward pass. Logits accumulate in float32
    whatever the parameter dtype.
    """
    return _tiled_logps_fwd(h_CND, embedding_VD, targets_CN, tiles, softcap, keep_logits)[0]


def _tile(embedding_VD, tiles: int, j):
    """Tile j: [V / tiles, D], the rows j, j + tiles, j + 2·tiles, …; and their vocabulary ids."""
    vocab, d = embedding_VD.shape
    e = jax.lax.dynamic_index_in_dim(embedding_VD.reshape(vocab // tiles, tiles, d), j, axis=1, keepdims=False)
    return e, jnp.arange(vocab // tiles) * tiles + j


def _tiled_logps_fwd(h_CND, embedding_VD, targets_CN, tiles, softcap, keep_logits=False):
    vocab = embedding_VD.shape[0]

    def token_chunk(xs):
        h_ND, t_N = xs
        n = h_ND.shape[0]

        def fold(carry, j):  # one vocabulary tile into the running log-sum-exp
            m, s, picked, z_sum = carry
            e_vD, ids_v = _tile(embedding_VD, tiles, j)
            raw = jnp.einsum("nd,vd->nv", h_ND, e_vD, preferred_element_type=jnp.float32)
            z = _softcap(raw, softcap)
            new_m = jnp.maximum(m, jnp.max(z, axis=-1))
            s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(z - new_m[:, None]), axis=-1)
            picked = picked + jnp.sum(jnp.where(ids_v[None, :] == t_N[:, None], z, 0.0), axis=-1)
            return (new_m, s, picked, z_sum + jnp.sum(z, axis=-1)), (raw if keep_logits else None)

        zeros = jnp.zeros((n,), jnp.float32)
        (m, s, picked, z_sum), raw_JNv = jax.lax.scan(
            fold, (jnp.full((n,), -jnp.inf, jnp.float32), zeros, zeros, zeros), jnp.arange(tiles))
        lse = m + jnp.log(s)
        return picked - lse, z_sum / vocab, lse, raw_JNv

    logps, mean_logits, lse, raw_CJNv = jax.lax.map(token_chunk, (h_CND, targets_CN))
    return (logps, mean_logits), (h_CND, embedding_VD, targets_CN, lse, raw_CJNv)


def _tiled_logps_bwd(tiles, softcap, keep_logits, residuals, cotangents):
    h_CND, embedding_VD, targets_CN, lse_CN, raw_CJNv = residuals
    g_logps_CN, g_mean_CN = cotangents
    vocab, d = embedding_VD.shape
    mm_dtype = embedding_VD.dtype  # the tile's gradient meets the weights in their dtype, accumulating in float32

    def vocab_tile(carry, j):
        """Tile j over every token chunk: its rows of d/de (written once), and d/dh accumulated."""
        dh_CND, de_VtD = carry
        e_vD, ids_v = _tile(embedding_VD, tiles, j)

        def token_chunk(de_vD, xs):
            h_ND, t_N, lse_N, g_N, gm_N, kept_Nv = xs
            raw = kept_Nv if keep_logits else jnp.einsum("nd,vd->nv", h_ND, e_vD, preferred_element_type=jnp.float32)
            z = _softcap(raw, softcap)
            p = jnp.exp(z - lse_N[:, None])
            is_target = (ids_v[None, :] == t_N[:, None]).astype(jnp.float32)
            dz = g_N[:, None] * (is_target - p) + (gm_N / vocab)[:, None]
            if softcap:
                dz = dz * (1.0 - jnp.square(jnp.tanh(raw / softcap)))
            dz = dz.astype(mm_dtype)
            dh = jnp.einsum("nv,vd->nd", dz, e_vD, preferred_element_type=jnp.float32)
            return de_vD + jnp.einsum("nv,nd->vd", dz, h_ND, preferred_element_type=jnp.float32), dh

        kept_CNv = raw_CJNv[:, j] if keep_logits else None
        de_vD, dh = jax.lax.scan(token_chunk, jnp.zeros(e_vD.shape, jnp.float32),
                                 (h_CND, targets_CN, lse_CN, g_logps_CN, g_mean_CN, kept_CNv))
        de_VtD = jax.lax.dynamic_update_index_in_dim(de_VtD, de_vD.astype(embedding_VD.dtype), j, axis=1)
        return (dh_CND + dh, de_VtD), None

    init = (jnp.zeros(h_CND.shape, jnp.float32), jnp.zeros((vocab // tiles, tiles, d), embedding_VD.dtype))
    (dh, de), _ = jax.lax.scan(vocab_tile, init, jnp.arange(tiles))
    return dh.astype(h_CND.dtype), de.reshape(vocab, d), None


_tiled_logps.defvjp(_tiled_logps_fwd, _tiled_logps_bwd)


def sft_loss(lp: ResponseLogps, example_mask_B, num_tokens_total):
    """Summed token NLL over response tokens; divide by the step's total response-token count."""
    nll_sum = -jnp.sum(lp.logps_B * example_mask_B)
    metrics = {"loss": nll_sum / num_tokens_total, "num_tokens": jnp.sum(lp.num_tokens_B * example_mask_B)}
    return nll_sum / num_tokens_total, metrics


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, pair_mask_B, num_pairs_total, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens_B=None, rejected_tokens_B=None, rpo_alpha: float = 0.0, chosen_nll_sum_B=None,
             num_chosen_tokens_total=None):
    """DPO (sigmoid, with cDPO label smoothing), IPO or hinge, plus optional RPO NLL on chosen.

    IPO uses length-averaged log-probs (Azar et al.), so it needs the token counts.
    """
    if loss_type == "ipo":
        delta = (policy_chosen_B - ref_chosen_B) / chosen_tokens_B - (policy_rejected_B - ref_rejected_B) / rejected_tokens_B
        per_pair = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        delta = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
        if loss_type == "sigmoid":
            per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                        - label_smoothing * jax.nn.log_sigmoid(-beta * delta))
        elif loss_type == "hinge":
            per_pair = jax.nn.relu(1.0 - beta * delta)
        else:
            raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {REFERENCE_LOSS_TYPES} "
                             "(simpo and orpo are simpo_loss and orpo_loss)")
    mask = pair_mask_B.astype(jnp.float32)
    total = jnp.sum(per_pair * mask) / num_pairs_total
    dpo_part = total
    if rpo_alpha:
        total = total + rpo_alpha * jnp.sum(chosen_nll_sum_B * mask) / num_chosen_tokens_total
    chosen_rewards = beta * (policy_chosen_B - ref_chosen_B)
    rejected_rewards = beta * (policy_rejected_B - ref_rejected_B)
    mean = _pair_mean(mask, num_pairs_total)
    metrics = {"loss": total, "dpo_loss": dpo_part,
               **_reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_B, policy_rejected_B, mean)}
    return total, metrics


def _pair_mean(mask, num_pairs_total):
    """x -> its contribution to the step mean over pairs, so micro-batch metrics add up."""
    return lambda x: jnp.sum(x * mask) / num_pairs_total


def _reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_B, policy_rejected_B, mean) -> dict:
    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": mean(policy_chosen_B),
        "logps/rejected": mean(policy_rejected_B),
    }


def simpo_loss(policy_chosen_B, policy_rejected_B, chosen_tokens_B, rejected_tokens_B, pair_mask_B,
               num_pairs_total, *, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024): −logσ(β·logπ(y_c)/|y_c| − β·logπ(y_r)/|y_r| − γ), no reference.

    The reward is β times the length-averaged log-prob, the quantity generation ranks by, so longer
    responses earn nothing for length alone; γ asks for a margin. The paper uses β of about 2 or more
    (DPO's default 0.1 is far too small here). `label_smoothing` ε mixes in −ε·logσ(−…) as cDPO does (TRL's
    CPOTrainer with loss_type="simpo").
    """
    chosen_rewards = beta * policy_chosen_B / chosen_tokens_B
    rejected_rewards = beta * policy_rejected_B / rejected_tokens_B
    z = chosen_rewards - rejected_rewards - gamma
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    mean = _pair_mean(pair_mask_B.astype(jnp.float32), num_pairs_total)
    total = mean(per_pair)
    metrics = {"loss": total, **_reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_B,
                                                 policy_rejected_B, mean)}
    return total, metrics


# log(1 − p) diverges as the average token probability p → 1: ORPO's averaged log-probs are capped here.
ORPO_MAX_AVG_LOGP = -1e-6


def log1mexp(a):
    """log(1 − e^a) for a < 0, accurate at both ends (Mächler 2012): log(−expm1(a)) above −ln 2, where
    1 − e^a cancels, and log1p(−e^a) below, where e^a is small."""
    return jnp.where(a > -jnp.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo_loss(policy_chosen_B, policy_rejected_B, chosen_tokens_B, rejected_tokens_B, pair_mask_B,
              num_pairs_total, num_chosen_tokens_total, *, beta: float):
    """ORPO (Hong et al. 2024): NLL(chosen) + λ·(−logσ(log odds(y_c) − log odds(y_r))), no reference.

    odds(y) = P/(1 − P) with P the length-averaged probability, so with a = logπ(y)/|y| the log odds are
    a − log(1 − e^a). The NLL is a mean over the step's chosen tokens, the odds-ratio term a mean over its
    pairs; `beta` is the paper's λ (TRL's ORPOTrainer names it beta too), rewards are β·a as in TRL.
    log(1 − e^a) is computed by `log1mexp` with a capped at ORPO_MAX_AVG_LOGP, so a sequence the model
    already predicts with certainty (a → 0⁻, or a masked row's a = 0) gives a finite loss and gradient.
    """
    avg_chosen_B, avg_rejected_B = policy_chosen_B / chosen_tokens_B, policy_rejected_B / rejected_tokens_B
    a_c, a_r = jnp.minimum(avg_chosen_B, ORPO_MAX_AVG_LOGP), jnp.minimum(avg_rejected_B, ORPO_MAX_AVG_LOGP)
    log_odds_B = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    log_sig_B = jax.nn.log_sigmoid(log_odds_B)
    mask = pair_mask_B.astype(jnp.float32)
    mean = _pair_mean(mask, num_pairs_total)
    nll = -jnp.sum(policy_chosen_B * mask) / num_chosen_tokens_total
    or_loss = -beta * mean(log_sig_B)
    total = nll + or_loss
    chosen_rewards, rejected_rewards = beta * avg_chosen_B, beta * avg_rejected_B
    metrics = {"loss": total, "nll_loss": nll, "or_loss": or_loss, "log_odds_ratio": mean(log_sig_B),
               "log_odds_chosen": mean(log_odds_B),
               **_reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_B, policy_rejected_B, mean)}
    return total, metrics
