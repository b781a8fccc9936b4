"""Log-probabilities of responses, and the SFT and DPO-family losses with TRL's metric names.

Notation (see shared conventions): for a pair, r_c = logπ(y_c|x) − logπ_ref(y_c|x), r_r likewise,
Δ = r_c − r_r; sequence log-probs are sums over response tokens.

Every loss returns `(total, metrics)` where `total` is a *sum* over examples (or tokens) and a
normaliser is passed in by the caller; dividing by a count fixed for the whole optimizer step is what
makes k accumulated micro-batches equal one k-times-larger batch exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class ResponseLogps(NamedTuple):
    token_logps_BR: jax.Array  # log p(target) at each response position (0 where masked)
    logps_B: jax.Array  # sum over response tokens
    num_tokens_B: jax.Array
    mean_logit_B: jax.Array  # mean logit over vocabulary and response tokens (TRL's logits/*)


def response_logps(hidden_BTD, embedding_VD, target_idx_BR, targets_BR, target_mask_BR, *,
                   chunk: int = 128, softcap: float | None = None) -> ResponseLogps:
    """Log-probs of response tokens, projecting only response positions onto the vocabulary, in chunks.

    Peak memory holds B × chunk × V float32 logits instead of B × T × V; each chunk is
    rematerialised in the backward pass, so neither pass ever stores the full logits.
    """
    hidden_BRD = jnp.take_along_axis(hidden_BTD, target_idx_BR[..., None], axis=1)
    b, r, d = hidden_BRD.shape
    chunk = min(chunk, r)
    pad = -r % chunk
    h = jnp.pad(hidden_BRD, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets_BR, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_BCD, t_BC):
        logits = jnp.einsum("bcd,vd->bcv", h_BCD, embedding_VD, preferred_element_type=jnp.float32)
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)[..., 0]
        return picked - lse, jnp.mean(logits, axis=-1)

    logps, mean_logits = jax.lax.map(lambda xs: one_chunk(*xs), (h, t))
    mask = target_mask_BR.astype(jnp.float32)
    token_logps = logps.swapaxes(0, 1).reshape(b, -1)[:, :r] * mask
    mean_logits = mean_logits.swapaxes(0, 1).reshape(b, -1)[:, :r] * mask
    count = mask.sum(-1)
    return ResponseLogps(token_logps, token_logps.sum(-1), count, mean_logits.sum(-1) / jnp.maximum(count, 1.0))


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
            raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    mask = pair_mask_B.astype(jnp.float32)
    total = jnp.sum(per_pair * mask) / num_pairs_total
    dpo_part = total
    if rpo_alpha:
        total = total + rpo_alpha * jnp.sum(chosen_nll_sum_B * mask) / num_chosen_tokens_total
    chosen_rewards = beta * (policy_chosen_B - ref_chosen_B)
    rejected_rewards = beta * (policy_rejected_B - ref_rejected_B)

    def mean(x):  # contribution to the step mean, so micro-batch metrics add up
        return jnp.sum(x * mask) / num_pairs_total

    metrics = {
        "loss": total,
        "dpo_loss": dpo_part,
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": mean(policy_chosen_B),
        "logps/rejected": mean(policy_rejected_B),
    }
    return total, metrics
