"""Tests for kwjax.shortcuts (the shortcut audit of preference sets) and `data_card.py --pairs`.

Expected values are worked out by hand in the comments; only the shipped-set figures come from the data
(they are the numbers the shortcut issue reports, checked within kwjax's feature definitions).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kwjax.shortcuts import (
    FEATURES,
    LARGER,
    SMALLER,
    audit,
    definition_sentences,
    features,
    longest_repeat,
    pairs_of,
    pairwise_separability,
    polite_endings,
    threshold_separability,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Features of one passage


def test_features_of_a_short_poem():
    text = "비가 온다\n\n바다가 운다"
    f = features(text)
    assert list(f) == list(FEATURES)
    # 비 가 ␣ 온 다 (5) + \n \n (2) + 바 다 가 ␣ 운 다 (6) = 13, whitespace included.
    assert f["chars"] == 13
    # 비 가 온 다 바 운: 다 and 가 occur twice, whitespace does not count.
    assert f["distinct_chars"] == 6
    assert f["words"] == 4
    assert f["lines"] == 2                      # the empty line does not count
    assert f["polite_endings"] == 0
    assert f["longest_repeat"] == 0             # 비가 온다 바다가 운다: no word occurs twice
    assert f["repeated_4gram"] == 0
    assert f["definitions"] == 0
    # Word bigrams (비가 온다) (온다 바다가) (바다가 운다): 3 unique of 3.
    assert f["distinct2_words"] == 1.0
    # Characters with the blank line collapsed to one space: "비가 온다 바다가 운다", 12 characters,
    # 11 bigrams; "가␣" occurs twice (비가␣, 바다가␣), so 10 unique.
    assert f["distinct2_chars"] == pytest.approx(10 / 11)


def test_polite_endings_by_hand():
    text = "감사합니다. 좋아요! 아니다. 먹었습니까? 필요. 비가 오니까"
    # 감사합니다 (ㅂ under 합 + 니다): yes; 좋아요 (요 after a syllable): yes; 아니다 (plain "is not"): no;
    # 먹었습니까 (습니까): yes; 필요 (a noun): no; 오니까 (connective "because", no ㅂ under 오): no.
    assert polite_endings(text) == 3
    assert features(text)["polite_endings"] == 3
    # Mid-sentence polite word followed by a comma is not a sentence ending; the last one is.
    assert polite_endings("괜찮아요, 정말 괜찮아요") == 1
    assert polite_endings("바다가 운다\n나는 간다") == 0


def test_repeated_ngrams_by_hand():
    # 나는 간다 ×3: the 4-gram "나는 간다 나는 간다" starts at words 0 and 2; the two 5-grams differ
    # (나는 간다 나는 간다 나는 / 간다 나는 간다 나는 간다), so the longest repeat is 4.
    f = features("나는 간다 나는 간다 나는 간다")
    assert (f["longest_repeat"], f["repeated_4gram"]) == (4, 1)
    assert f["words"] == 6 and f["distinct_chars"] == 4      # 나 는 간 다
    # Only 바람 repeats.
    assert longest_repeat("바람 불고 바람 분다") == 1
    assert features("바람 불고 바람 분다")["repeated_4gram"] == 0
    assert longest_repeat("") == 0 and longest_repeat("하나") == 0


def test_definition_sentences_by_hand():
    text = "등대는 배를 안내하는 시설이다. 그는 떠날 것이다. 사랑은 기다림을 뜻한다\n비는 밤새 내렸기 때문이다."
    # 1: 등대는 … 시설이다 (topic + 이다): yes. 2: 떠날 것이다 (ㄹ 것이다, a conjecture): no.
    # 3: 사랑은 … 뜻한다: yes. 4: … 때문이다 (a cause): no.
    assert definition_sentences(text) == 2
    assert definition_sentences("바다란 끝없이 푸른 것을 말한다.") == 1
    assert definition_sentences("바다가 운다. 시설이다.") == 0       # no topic-marked first word


# --------------------------------------------------------------------------------------------------
# Separability


def test_pairwise_length_three_of_four():
    # chars: chosen 4, 3, 5, 1; rejected 2, 1, 3, 4. The chosen is longer in the first three pairs.
    pairs = [("가나다라", "가나"), ("가나다", "가"), ("가나다라마", "가나다"), ("가", "가나다라")]
    r = audit(pairs)["chars"]
    assert (r.pairwise, r.pairwise_correct, r.direction, r.ties) == (0.75, 3, LARGER, 0)
    assert (r.chosen_mean, r.rejected_mean) == (13 / 4, 10 / 4)


def test_pairwise_ties_count_half():
    # (3, 3) tie = 0.5, (5, 1) win = 1: 1.5 of 2.
    assert pairwise_separability([(3, 3), (5, 1)]) == (0.75, 1.5, LARGER, 1)
    # (2, 2) tie, two losses: wins 0.5 of 3 = 1/6, so the reverse rule gets 2.5 of 3.
    assert pairwise_separability([(2, 2), (1, 4), (1, 4)]) == (2.5 / 3, 2.5, SMALLER, 1)
    # All ties: 0.5, either way.
    assert pairwise_separability([(1, 1), (7, 7)])[:2] == (0.5, 1.0)


def test_pairwise_direction_flips_when_chosen_is_shorter():
    pairs = [("가", "가나다"), ("나나", "가나다라"), ("다", "가나")]
    r = audit(pairs)["chars"]
    assert (r.pairwise, r.pairwise_correct, r.direction) == (1.0, 3, SMALLER)
    assert audit(pairs).best.direction == SMALLER


def test_threshold_by_hand():
    # Sorted: 1r 2r 4c 5c 5r 6c ("passage is chosen when above the cut"):
    #   cut 1.5: chosen above 3 + rejected below 1 = 4/6;  cut 3: 3 + 2 = 5/6;  cut 4.5: 2 + 2 = 4/6;
    #   cut 5.5: 1 + 3 = 4/6;  cut 7: 0 + 3 = 3/6; the reverse rules are 1 minus these, at most 3/6.
    # The tie at 5 (one chosen, one rejected) cannot be split, so the best is 5/6 at cut 3.
    assert threshold_separability([4, 5, 6], [1, 2, 5]) == (pytest.approx(5 / 6), 3.0, LARGER)
    # Pairwise, the same three pairs (4, 1) (5, 2) (6, 5) are all ranked right: the two measures differ.
    assert pairwise_separability([(4, 1), (5, 2), (6, 5)])[:3] == (1.0, 3, LARGER)
    # Reverse direction: chosen 1, 2 below rejected 3, 4; the cut is midway between 2 and 3.
    assert threshold_separability([1, 2], [3, 4]) == (1.0, 2.5, SMALLER)
    # No information: everything labelled one way, 0.5.
    assert threshold_separability([1, 1], [1, 1])[0] == 0.5


def test_best_feature_and_empty_input():
    # Chosen longer and richer in both pairs; features tie at 1.0 pairwise, the first in FEATURES order
    # with the best threshold wins: chars (4 vs 2 and 3 vs 1 → cut 2.5 separates all four passages).
    a = audit([("가나다라", "가나"), ("다라마", "가")])
    assert a.best.feature == "chars"
    assert (a.best.pairwise, a.best.threshold, a.best.cut) == (1.0, 1.0, 2.5)
    assert [r.feature for r in a.results] == list(FEATURES)
    with pytest.raises(ValueError):
        audit([])
    with pytest.raises(KeyError):
        a["no such feature"]


# --------------------------------------------------------------------------------------------------
# The shipped set: the figures of the shortcut issue


@pytest.fixture(scope="module")
def shipped():
    from kwjax.data import dpo_view, load_examples
    return pairs_of(dpo_view(load_examples()))


def test_shipped_set_shortcuts(shipped):
    a = audit(shipped)
    assert len(shipped) == 175
    # "The rejected one is shorter in 167/175 pairs": characters including spaces and line breaks, no ties.
    assert (a["chars"].pairwise_correct, a["chars"].direction, a["chars"].ties) == (167, LARGER, 0)
    # "The passage with more distinct characters is chosen ranks 174/175 pairs correctly."
    assert (a["distinct_chars"].pairwise_correct, a["distinct_chars"].direction) == (174, LARGER)
    assert a.best.pairwise_correct >= 170 and a.best.direction == LARGER


def test_shipped_set_rule_flags(shipped):
    # The combined rules, within kwjax's definitions (the data card quotes these numbers):
    # under 120 characters, a polite ending, a repeated word 4-gram, or a definition sentence.
    def flagged(text):
        f = features(text)
        return f["chars"] < 120 or f["polite_endings"] > 0 or f["repeated_4gram"] == 1 or f["definitions"] > 0
    assert sum(flagged(r) for _, r in shipped) == 173
    assert sum(flagged(c) for c, _ in shipped) == 3


def test_load_records_pairs_match_shipped(shipped):
    from kwjax.data import SOURCE_PATH, load_records
    assert pairs_of(load_records(SOURCE_PATH, "dpo")) == shipped


# --------------------------------------------------------------------------------------------------
# scripts/data_card.py --pairs


def test_data_card_pairs_cli(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "p1", "chosen": "가나다라", "rejected": "가나", "keywords": ["가", "나", "다"]},
            {"prompt": "p2", "chosen": "다라마", "rejected": "가", "keywords": ["가", "나", "다"]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    card = (REPO / "data" / "CARD.md").read_text(encoding="utf-8")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "data_card.py"), "--pairs", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "best single feature: chars separates 2/2 pairs (1.000), larger is chosen"
    # chars: chosen 4, 3; rejected 2, 1; threshold: all four passages right at cut 2.5.
    assert "| chars | 3.50 | 1.50 | 2/2 (1.000) | larger is chosen | 0 | 1.000 | chosen if > 2.5 |" in lines
    assert sum(l.startswith("| ") for l in lines) == 2 + len(FEATURES)      # header, rule, one row per feature
    assert (REPO / "data" / "CARD.md").read_text(encoding="utf-8") == card   # the card is left alone
