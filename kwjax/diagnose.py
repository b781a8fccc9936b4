"""Why a model does not stop: its end-of-turn probability where the reference passages end.

A model that never ends its output with `<end_of_turn>` under greedy decoding has either not learned
the format (it gives `<end_of_turn>` little probability even where a passage is complete) or has
learned it and never reaches such a point (it falls into a loop first, and inside the loop the end
of a passage never comes). Teacher forcing tells the two apart: feed the prompt and the reference
passage, and read p(<end_of_turn>) at the position that must predict it, beside the same probability
at the passage's line ends, where a passage could plausibly stop but the reference goes on.

A third reading tells whether `<end_of_turn>` can win at all: the probability the model puts, at the
same end positions, on the tokens whose (tied) embedding rows point almost where `<end_of_turn>`'s row
points (cosine >= 0.99). In the pretrained Gemma 3 270M that is ~4.7k untrained rows (`<unusedN>`...):
whatever raises `<end_of_turn>`'s logit raises theirs nearly as much (kwjax.token_rows).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kwjax import batching
from kwjax.models.gemma3.model import logits_from_hidden, positions_from_mask


@dataclasses.dataclass
class StopScores:
    id: str
    end_logp: float  # log p(<end_of_turn>) where the reference passage ends
    end_rank: int  # 0: <end_of_turn> is the model's first choice there
    line_end_logps: list[float]  # log p(<end_of_turn>) at the passage's inner line ends ("\n" next)
    end_near_logp: float = float("nan")  # log p(any token whose row lies near <end_of_turn>'s) at the end


NEAR_COSINE = 0.99


def near_rows(embedding_VD, token_id: int, cosine: float = NEAR_COSINE) -> np.ndarray:
    """Ids (other than `token_id`) whose embedding row has cosine >= `cosine` with `token_id`'s row."""
    e = np.asarray(jax.device_get(embedding_VD), np.float32)
    norms = np.maximum(np.linalg.norm(e, axis=1), 1e-12)
    cos = (e @ e[token_id]) / (norms * norms[token_id])
    cos[token_id] = -1.0
    return np.flatnonzero(cos >= cosine).astype(np.int32)


def stop_scores(model, rows: Sequence[dict], *, batch_size: int = 8, response_field: str = "chosen"
                ) -> list[StopScores]:
    """Teacher-forced end-of-turn scores of `model` on each row's prompt + reference passage."""
    tok = model.tokenizer
    eot, newline = tok.end_of_turn_id, tok.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {newline}; expected a single token")
    seqs = [batching.encode_exchange(tok, r["prompt"], r[response_field]) for r in rows]
    near = near_rows(model.params["embedding"], eot)

    @jax.jit
    def eot_logps(params, tokens_BT, mask_BT, rows_R, cols_R):
        hidden_BTD = model.module.apply({"params": params}, tokens_BT, positions_from_mask(mask_BT),
                                        return_hidden=True)
        picked_1RD = hidden_BTD[rows_R, cols_R][None]
        logits_RV = logits_from_hidden(model.config, params["embedding"], picked_1RD)[0]
        logp_RV = jax.nn.log_softmax(logits_RV, axis=-1)
        rank_R = jnp.sum(logits_RV > logits_RV[:, eot:eot + 1], axis=-1)
        near_R = (jax.nn.logsumexp(logp_RV[:, near], axis=-1) if near.size
                  else jnp.full(logp_RV.shape[:1], -jnp.inf))
        return logp_RV[:, eot], rank_R, near_R

    out: list[StopScores] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = batching.round_up(max(len(s) for s in chunk), 64)
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        picks: list[tuple[int, int, int]] = []  # (row in batch, position, which: -1 end / k-th line end)
        for i, s in enumerate(chunk):
            ids = list(s.prompt) + list(s.response)
            tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
            if ids[-1] != eot:
                raise ValueError(f"row {start + i}: its encoded response does not end with <end_of_turn>")
            first = len(s.prompt)
            picks.append((i, len(ids) - 2, -1))  # the position whose next token is <end_of_turn>
            picks += [(i, p - 1, 1) for p in range(first + 1, len(ids) - 1) if ids[p] == newline[0]]
        r = np.array([p[0] for p in picks], np.int32)
        c = np.array([p[1] for p in picks], np.int32)
        logp, rank, near_logp = jax.device_get(eot_logps(model.params, tokens, mask, r, c))
        for i, s in enumerate(chunk):
            mine = [j for j, p in enumerate(picks) if p[0] == i]
            end = next(j for j in mine if picks[j][2] == -1)
            out.append(StopScores(str(rows[start + i].get("id", start + i)), float(logp[end]), int(rank[end]),
                                  [float(logp[j]) for j in mine if picks[j][2] != -1], float(near_logp[end])))
    return out


def summary(scores: Sequence[StopScores]) -> dict:
    """Medians over rows: the end's probability and rank, and the inner line ends' probability."""
    end_p = np.exp([s.end_logp for s in scores])
    inner = np.exp([lp for s in scores for lp in s.line_end_logps]) if any(s.line_end_logps for s in scores) \
        else np.array([np.nan])
    return {"rows": len(scores), "end_p_median": float(np.median(end_p)),
            "end_top1_rate": float(np.mean([s.end_rank == 0 for s in scores])),
            "end_rank_median": float(np.median([s.end_rank for s in scores])),
            "line_end_p_median": float(np.median(inner)), "line_ends": int(np.isfinite(inner).sum()),
            "end_near_p_median": float(np.median(np.exp([s.end_near_logp for s in scores])))}
