"""Training objectives by name: what data each trains on, whether it needs a reference, and its loss.

The train step asks the entry (`get(method, config)`) instead of branching on the method: the entry
says how the batch is laid out (`data`), whether the reference's sequence log-probs must be computed
(`needs_reference`), and turns the policy's response log-probs into `(loss, metrics)`.

Losses are sums divided by step-level normalisers (`totals`), computed once over the whole step batch
before it is cut into micro-batches, so k accumulated micro-batches give exactly the full batch's loss.
Pair data stacks the chosen rows [0, B/2) above the rejected rows [B/2, B) (`kwjax.batching`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from kwjax import losses


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # "sft", or a `dpo.loss_type`: "sigmoid", "ipo", "hinge", "simpo", "orpo"
    data: str  # "sft" (one sequence per row) or "pairs" (chosen rows, then rejected rows)
    needs_reference: bool  # the step must supply the reference model's sequence log-probs
    normaliser: str  # what the step total is divided by
    # loss(lp, ref_logps_B | None, micro, totals, config) -> (loss, metrics)
    loss: Callable[..., tuple[jax.Array, dict]]


def split_pairs(x):
    """[B, ...] -> (chosen [B/2, ...], rejected [B/2, ...])."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _sft(lp: losses.ResponseLogps, ref_logps_B, micro, totals, config):
    return losses.sft_loss(lp, micro["example_mask_B"], totals["tokens"])


def _pair_views(lp: losses.ResponseLogps, micro):
    """The chosen/rejected halves every preference loss reads; token counts floored at 1 (padded pairs)."""
    pc, pr = split_pairs(lp.logps_B)
    tc, tr = split_pairs(lp.num_tokens_B)
    pair_mask = split_pairs(micro["example_mask_B"])[0]
    return pc, pr, tc, tr, pair_mask


def _with_pair_metrics(loss_fn):
    """Adds TRL's logits/chosen, logits/rejected, the step's response-token count and the per-token
    preference accuracy to a pair loss.

    `preference_accuracy` is the evaluation's (shared conventions): the chosen response's mean token
    log-prob above the rejected one's, no reference. DPO's `rewards/accuracies` compares summed log-prob
    changes instead, which a long chosen passage loses on as soon as every token drifts a little; the
    two disagree exactly when that happens (docs/recipe-270m, section 4), so the log keeps both."""

    def loss(lp: losses.ResponseLogps, ref_logps_B, micro, totals, config):
        out, metrics = loss_fn(lp, ref_logps_B, micro, totals, config)
        pc, pr, tc, tr, pair_mask = _pair_views(lp, micro)
        lc, lr = split_pairs(lp.mean_logit_B)
        metrics["logits/chosen"] = jnp.sum(lc * pair_mask) / totals["pairs"]
        metrics["logits/rejected"] = jnp.sum(lr * pair_mask) / totals["pairs"]
        wins = (pc / jnp.maximum(tc, 1.0) > pr / jnp.maximum(tr, 1.0)).astype(jnp.float32)
        metrics["preference_accuracy"] = jnp.sum(wins * pair_mask) / totals["pairs"]
        metrics["num_tokens"] = jnp.sum((tc + tr) * pair_mask)
        return out, metrics

    return loss


def _dpo(loss_type: str):
    """DPO-family loss against the reference's log-probs; cDPO smoothing and RPO's NLL from config.dpo."""

    def loss(lp: losses.ResponseLogps, ref_logps_B, micro, totals, config):
        pc, pr, tc, tr, pair_mask = _pair_views(lp, micro)
        rc, rr = split_pairs(ref_logps_B)
        d = config.dpo
        return losses.dpo_loss(
            pc, pr, rc, rr, pair_mask, totals["pairs"], beta=d.beta, loss_type=loss_type,
            label_smoothing=d.label_smoothing, chosen_tokens_B=jnp.maximum(tc, 1.0),
            rejected_tokens_B=jnp.maximum(tr, 1.0), rpo_alpha=d.rpo_alpha, chosen_nll_sum_B=-pc,
            num_chosen_tokens_total=totals["chosen_tokens"])

    return loss


def _simpo(lp: losses.ResponseLogps, ref_logps_B, micro, totals, config):
    pc, pr, tc, tr, pair_mask = _pair_views(lp, micro)
    d = config.dpo
    return losses.simpo_loss(pc, pr, jnp.maximum(tc, 1.0), jnp.maximum(tr, 1.0), pair_mask, totals["pairs"],
                             beta=d.beta, gamma=d.simpo_gamma, label_smoothing=d.label_smoothing)


def _orpo(lp: losses.ResponseLogps, ref_logps_B, micro, totals, config):
    pc, pr, tc, tr, pair_mask = _pair_views(lp, micro)
    return losses.orpo_loss(pc, pr, jnp.maximum(tc, 1.0), jnp.maximum(tr, 1.0), pair_mask, totals["pairs"],
                            totals["chosen_tokens"], beta=config.dpo.beta)


_PAIRS = "pairs of the step"
REGISTRY: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", "sft", False, "response tokens of the step", _sft),
    Objective("sigmoid", "pairs", True, _PAIRS, _with_pair_metrics(_dpo("sigmoid"))),
    Objective("ipo", "pairs", True, _PAIRS, _with_pair_metrics(_dpo("ipo"))),
    Objective("hinge", "pairs", True, _PAIRS, _with_pair_metrics(_dpo("hinge"))),
    Objective("simpo", "pairs", False, _PAIRS, _with_pair_metrics(_simpo)),
    Objective("orpo", "pairs", False, "pairs of the step (odds-ratio term); chosen response tokens of the "
              "step (NLL term)", _with_pair_metrics(_orpo)),
)}
PREFERENCE_LOSSES = tuple(name for name, o in REGISTRY.items() if o.data == "pairs")
assert PREFERENCE_LOSSES == losses.LOSS_TYPES, (PREFERENCE_LOSSES, losses.LOSS_TYPES)


def get(method: str, config) -> Objective:
    """The objective a stage trains: "sft", or "dpo" with `config.dpo.loss_type` choosing the loss."""
    if method == "sft":
        return REGISTRY["sft"]
    if method != "dpo":
        raise ValueError(f"method is {method!r}; expected 'sft' or 'dpo'")
    loss_type = config.dpo.loss_type
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"dpo.loss_type is {loss_type!r}; expected one of {PREFERENCE_LOSSES}")
    return REGISTRY[loss_type]


def totals(objective: Objective, batch) -> dict:
    """The step's normalisers, from the whole step batch (never from one micro-batch); each at least 1."""
    mask_BR = batch["target_mask_BR"].astype(jnp.float32)
    if objective.data == "sft":
        return {"tokens": jnp.maximum(mask_BR.sum(), 1.0)}
    chosen_mask_BR = split_pairs(mask_BR)[0]
    pairs = split_pairs(batch["example_mask_B"])[0].astype(jnp.float32).sum()
    return {"pairs": jnp.maximum(pairs, 1.0), "chosen_tokens": jnp.maximum(chosen_mask_BR.sum(), 1.0)}
