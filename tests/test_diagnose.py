"""kwjax.diagnose: teacher-forced end-of-turn scores, checked against the model's full logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import tiny_config
from kwjax import batching, stages
from kwjax.diagnose import stop_scores, summary
from kwjax.models.gemma3.model import positions_from_mask

ROWS = [{"id": "a", "prompt": "바다, 별, 꿈을 넣어 시를 써 줘", "chosen": "별이 진다\n바다는 꿈을 꾼다\n끝"},
        {"id": "b", "prompt": "짧게", "chosen": "한 줄뿐인 글"}]


@pytest.fixture(scope="module")
def model():
    return stages.load_model(tiny_config())


def test_stop_scores_equal_the_full_forward(model):
    tok = model.tokenizer
    got = stop_scores(model, ROWS, batch_size=2)
    for row, s in zip(ROWS, got):
        seq = batching.encode_exchange(tok, row["prompt"], row["chosen"])
        ids = np.array([list(seq.prompt) + list(seq.response)], np.int32)
        mask = np.ones_like(ids, bool)
        logits = np.asarray(model.module.apply({"params": model.params}, ids, positions_from_mask(mask)))[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        eot, nl = tok.end_of_turn_id, tok.encode("\n")[0]
        end = ids.shape[1] - 2  # predicts the final <end_of_turn>
        assert ids[0, -1] == eot
        np.testing.assert_allclose(s.end_logp, logp[end, eot], atol=2e-4)
        assert s.end_rank == int((logits[end] > logits[end, eot]).sum())
        inner = [p - 1 for p in range(len(seq.prompt) + 1, ids.shape[1] - 1) if ids[0, p] == nl]
        assert len(inner) == row["chosen"].count("\n")  # "\n" is one token here, inside the passage only
        np.testing.assert_allclose(s.line_end_logps, [logp[p, eot] for p in inner], atol=2e-4)
    out = summary(got)
    assert out["rows"] == 2 and out["line_ends"] == 2
    np.testing.assert_allclose(out["end_p_median"], np.median(np.exp([s.end_logp for s in got])), rtol=1e-6)


def test_mass_near_the_end_of_turn_row_is_the_sum_over_those_rows(model):
    """Rows planted next to <end_of_turn>'s (cosine ~1): found, and their probability summed at the end."""
    import dataclasses

    from kwjax.diagnose import near_rows

    tok = model.tokenizer
    eot = tok.end_of_turn_id
    e = np.array(model.params["embedding"])
    planted = [11, 12, 13]
    rng = np.random.default_rng(0)
    for i in planted:
        e[i] = e[eot] * 1.01 + 1e-4 * rng.standard_normal(e.shape[1])
    params = {**model.params, "embedding": jax.numpy.asarray(e)}
    assert list(near_rows(params["embedding"], eot)) == planted
    twin = dataclasses.replace(model, params=params)
    got = stop_scores(twin, ROWS[:1], batch_size=1)[0]
    seq = batching.encode_exchange(tok, ROWS[0]["prompt"], ROWS[0]["chosen"])
    ids = np.array([list(seq.prompt) + list(seq.response)], np.int32)
    logits = np.asarray(model.module.apply({"params": params}, ids, positions_from_mask(np.ones_like(ids, bool))),
                        np.float64)[0, -2]
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    np.testing.assert_allclose(got.end_near_logp, np.log(np.exp(logp[planted]).sum()), atol=2e-4)
    assert summary([got])["end_near_p_median"] == pytest.approx(np.exp(got.end_near_logp), rel=1e-6)
