"""Evaluation likelihoods against full-logit log-softmax; generation bookkeeping."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

from kwjax import batching, evaluate
from kwjax.stages import load_model

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"id": "a", "prompt": "'바다', '편지', '기다림'으로 시를 써 줘.", "keywords": ["바다", "편지", "기다림"],
     "chosen": "바다는 편지를 삼키고\n기다림은 모래처럼 쌓인다", "rejected": "바다 편지 기다림"},
    {"id": "b", "prompt": "Write about rain.", "keywords": ["rain"],
     "chosen": "Rain taps the window like a patient friend.", "rejected": "Rain is water."},
    {"id": "c", "prompt": "짧게", "keywords": [], "chosen": "응.", "rejected": "싫어요, 길게 쓰겠습니다. 정말 길게."},
]


@pytest.fixture(scope="module")
def tiny():
    cfg = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    return load_model(cfg)


def full_logit_logps(model, seq: batching.Sequence_) -> tuple[float, int]:
    ids = list(seq.prompt + seq.response)
    logits = model.logits(np.asarray(ids)[None])[0].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    start = len(seq.prompt)
    return float(sum(logp[j - 1, ids[j]] for j in range(start, len(ids)))), len(seq.response)


def test_likelihoods_match_full_logits(tiny):
    settings = evaluate.EvalSettings(batch_size=2, max_length=256)
    lik = evaluate.pair_likelihoods(tiny, ROWS, settings)
    pairs, _, _ = batching.encode_dpo(tiny.tokenizer, ROWS, 256)
    chosen = [full_logit_logps(tiny, c) for c, _ in pairs]
    rejected = [full_logit_logps(tiny, r) for _, r in pairs]
    for p, (c_lp, c_n), (r_lp, r_n) in zip(lik, chosen, rejected):
        assert (p.chosen_tokens, p.rejected_tokens) == (c_n, r_n)
        assert abs(p.chosen_logp - c_lp) < 1e-3 and abs(p.rejected_logp - r_lp) < 1e-3
    got = evaluate.summarize([], lik)["likelihood"]
    nll = -sum(lp for lp, _ in chosen) / sum(n for _, n in chosen)
    assert abs(got["nll_chosen"]["mean"] - nll) < 1e-4
    assert abs(got["perplexity_chosen"]["mean"] - np.exp(nll)) / np.exp(nll) < 1e-4
    expected = [c[0] / c[1] > r[0] / r[1] for c, r in zip(chosen, rejected)]
    assert got["preference_accuracy"]["mean"] == pytest.approx(np.mean(expected))


def test_generate_counts_and_modes(tiny, tmp_path):
    settings = evaluate.EvalSettings(max_new_tokens=4, num_samples=2, batch_size=2)
    gens = evaluate.generate(tiny, ROWS[:2], settings, progress=False)
    assert [(g.id, g.mode, g.sample_index) for g in gens] == [
        ("a", "greedy", 0), ("b", "greedy", 0), ("a", "sample", 0), ("b", "sample", 0), ("a", "sample", 1),
        ("b", "sample", 1)]
    assert all(0 < len(g.tokens) <= 4 for g in gens)
    again = evaluate.generate(tiny, ROWS[:2], settings, progress=False)
    assert [g.tokens for g in gens] == [g.tokens for g in again]  # seeded
    evaluate.write_samples(tmp_path / "s.jsonl", gens)
    assert len((tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()) == 6


def test_evaluate_writes_metrics_with_intervals(tiny, tmp_path):
    settings = evaluate.EvalSettings(max_new_tokens=6, num_samples=2, batch_size=2, max_length=256)
    result = evaluate.evaluate(tiny, ROWS, settings, tmp_path, progress=False)
    saved = __import__("json").loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved["prompts"] == 3
    for mode in ("greedy", "sample"):
        for name in ("keyword_coverage/surface", "all_keywords/morpheme", "prompt_echo", "seq_rep_4", "terminated"):
            m = saved[mode][name]
            assert m["low"] <= m["mean"] <= m["high"], (mode, name, m)
    assert 0.0 <= result["likelihood"]["preference_accuracy"]["mean"] <= 1.0
    assert len((tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()) == 3 * 3


def test_keywords_file_rows_and_errors(tmp_path):
    f = tmp_path / "k.jsonl"
    f.write_text('{"keywords": ["등대", "소금", "약속"]}\n\n{"keywords": []}\n', encoding="utf-8")
    from kwjax.data import DataError

    with pytest.raises(DataError, match=r"k\.jsonl, line 3, field 'keywords': expected a non-empty list"):
        evaluate.rows_from_keywords_file(f)
    f.write_text('{"keywords": ["등대", "소금", "약속"]}\n', encoding="utf-8")
    rows = evaluate.rows_from_keywords_file(f)
    assert rows[0]["keywords"] == ["등대", "소금", "약속"] and "등대, 소금, 약속" in rows[0]["prompt"]
