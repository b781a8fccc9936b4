"""Tests for kwjax.metrics beyond seq-rep/distinct (those are in test_data.py).

Sections: keyword coverage with prompt-echo exclusion, generation metrics (seq-rep, distinct, Self-BLEU,
length, termination), preference accuracy, bootstrap intervals. Expected numbers are worked out by hand in
the comments, or by sacrebleu's own sentence_bleu where the code under test reimplements its statistics.
"""

from __future__ import annotations

import math
import types
import unicodedata

import numpy as np
import pytest
import sacrebleu

from kwjax.keywords import keyword_hits
from kwjax.metrics import (
    Coverage,
    bootstrap_ci,
    coverage_summary,
    coverage_values,
    find_prompt_echo,
    generation_metrics,
    generation_values,
    grouped_bootstrap_ci,
    keyword_coverage,
    mask_prompt_echo,
    preference_accuracy,
    reward_wins,
    preference_wins,
    self_bleu,
    self_bleu_values,
    termination_rate,
    termination_values,
    with_ci,
)

LEVELS = ("surface", "morpheme")
PROMPT = "'바다', '등대', '흔들리다'가 들어간 시를 한 편 써 주세요."
KEYWORDS = ("바다", "등대", "흔들리다")
KINDS = ("concrete", "concrete", "verb")


# =================================================================================================
# Keyword coverage and prompt echo


@pytest.mark.parametrize(
    "output",
    [
        "바다를 건너온 바람에 등대 불빛이 흔들리는 밤",   # 바다+를, 흔들리+는
        "바다에서 돌아온 배는 등대 아래에서 흔들렸다",     # 바다+에서, 흔들리+었 -> 흔들렸
    ],
)
def test_coverage_through_particles_and_endings(output):
    cov = keyword_coverage(output, PROMPT, KEYWORDS, kinds=KINDS)
    assert not cov.echo and cov.echo_spans == () and cov.echo_chars == 0
    for level in LEVELS:
        assert cov.hits[level] == (True, True, True)
        assert cov.all_present(level) and cov.rate(level) == 1.0


def test_coverage_missing_keyword_and_inferred_kinds():
    # No 바다, no form of 흔들리다; kinds not given, so 흔들리다 must be inferred as a verb (and 바다 a noun).
    cov = keyword_coverage("파도가 밀려오는 등대 아래", PROMPT, KEYWORDS)
    for level in LEVELS:
        assert cov.hits[level] == (False, True, False)
        assert not cov.all_present(level)
        assert cov.rate(level) == pytest.approx(1 / 3)


def test_pure_echo_covers_nothing():
    # What the base model does: the instruction line, over and over.
    output = (PROMPT + "\n") * 3
    for level in LEVELS:  # unmasked, the echo alone "covers" every keyword
        assert keyword_hits(output, KEYWORDS, level) == [True, True, True]
    cov = keyword_coverage(output, PROMPT, KEYWORDS, kinds=KINDS)
    assert cov.echo
    assert [output[a:b] for a, b in cov.echo_spans] == [PROMPT] * 3
    assert cov.echo_chars == 3 * len(PROMPT)
    assert cov.remaining.strip() == ""
    for level in LEVELS:
        assert cov.hits[level] == (False, False, False)
        assert cov.rate(level) == 0.0


def test_echo_plus_real_use_elsewhere():
    output = PROMPT + "\n바다에서 돌아온 사람이 흔들리는 불빛을 보았다"
    cov = keyword_coverage(output, PROMPT, KEYWORDS, kinds=KINDS)
    assert cov.echo and cov.echo_spans == ((0, len(PROMPT)),)
    for level in LEVELS:
        # 바다 and 흔들리다 are used after the echo; 등대 only inside it.
        assert cov.hits[level] == (True, False, True)
        assert not cov.all_present(level)


def test_short_copy_of_a_keyword_is_not_an_echo():
    # "'바다'" is 4 characters in common with the prompt, below the 10-character rule.
    cov = keyword_coverage("'바다'를 보았다", PROMPT, KEYWORDS, kinds=KINDS)
    assert not cov.echo
    assert cov.hits["surface"] == (True, False, False)


def test_echo_threshold_is_ten_characters():
    assert find_prompt_echo("zz abcdefghij zz", "abcdefghij") == [(3, 13)]   # exactly 10 in common
    assert find_prompt_echo("zz abcdefghi zz", "abcdefghij") == []           # 9 in common
    assert find_prompt_echo("zz abcde zz", "abcdefghij", min_chars=5) == [(3, 8)]
    # Overlapping windows merge into one span covering the whole copy, whitespace included.
    assert find_prompt_echo("abcde fghijklm!", "__abcde fghijklm__") == [(0, 14)]
    with pytest.raises(ValueError):
        find_prompt_echo("a", "a", min_chars=0)


def test_echo_ignores_rewrapped_whitespace_and_decomposed_hangul():
    prompt = "바다 / 등대 / 흔들리다\n세 단어를 넣어 주세요"
    output = "바다  /  등대 / 흔들리다 세 단어를\n넣어"  # spaces doubled, newline moved
    assert find_prompt_echo(output, prompt) == [(0, len(output))]
    assert find_prompt_echo(unicodedata.normalize("NFD", PROMPT), PROMPT) == [(0, len(PROMPT))]


def test_mask_does_not_glue_the_sides_together():
    # Deleting the echo would leave 바다; a line break keeps the two syllables apart.
    remaining, spans = mask_prompt_echo("바0123456789다", "0123456789")
    assert spans == [(1, 11)] and remaining == "바\n다"
    cov = keyword_coverage("바0123456789다", "0123456789", ["바다"], kinds=["concrete"])
    assert cov.hits == {"surface": (False,), "morpheme": (False,)}


def test_coverage_aggregate():
    results = [
        # 3/3; 0/3 with echo; 2/3 with echo.
        keyword_coverage("바다를 건너온 바람에 등대 불빛이 흔들리는 밤", PROMPT, KEYWORDS, kinds=KINDS),
        keyword_coverage((PROMPT + "\n") * 2, PROMPT, KEYWORDS, kinds=KINDS),
        keyword_coverage(PROMPT + "\n바다에서 흔들리는 배", PROMPT, KEYWORDS, kinds=KINDS),
    ]
    summary = coverage_summary(results)
    for level in LEVELS:
        assert summary[f"keyword_coverage/{level}"] == pytest.approx((1 + 0 + 2 / 3) / 3)  # 5/9
        assert summary[f"all_keywords/{level}"] == pytest.approx(1 / 3)
    assert summary["prompt_echo"] == pytest.approx(2 / 3)
    values = coverage_values(results)
    assert values["prompt_echo"].tolist() == [0.0, 1.0, 1.0]
    assert values["all_keywords/surface"].tolist() == [1.0, 0.0, 0.0]
    surface_only = keyword_coverage("바다", PROMPT, KEYWORDS, levels=("surface",))
    assert isinstance(surface_only, Coverage) and set(surface_only.hits) == {"surface"}
    with pytest.raises(ValueError):  # mixing results computed at different levels
        coverage_values([results[0], surface_only])


# =================================================================================================
# Generation metrics

SMALL = ["a b a b a b", "a b c d e"]


def test_generation_metrics_small():
    # Output 1, word bigrams ab ba ab ba ab: 5 total, 2 unique -> seq-rep-2 = 0.6; trigrams aba bab aba bab
    # -> 0.5; 4-grams abab baba abab -> 1/3. Output 2 repeats nothing -> 0. Means 0.3, 0.25, 1/6.
    # distinct-1: 11 unigrams, 5 unique (a..e) -> 5/11. distinct-2: 5 + 4 bigrams, unique ab ba bc cd de
    # -> 5/9. Lengths: 11 and 9 characters, 6 and 5 words.
    m = generation_metrics(SMALL, ["stop_token", "max_new_tokens"])
    expected = {"seq_rep_2": 0.3, "seq_rep_3": 0.25, "seq_rep_4": 1 / 6, "distinct_1": 5 / 11,
                "distinct_2": 5 / 9, "length_chars": 10.0, "length_words": 5.5, "terminated": 0.5}
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert set(m) == set(expected) | {"self_bleu"}
    v = generation_values(SMALL)
    assert v["seq_rep_2"].tolist() == pytest.approx([0.6, 0.0])
    assert "terminated" not in v
    with pytest.raises(ValueError):
        generation_values(SMALL, ["stop_token"])


def test_length_counts_whitespace_runs_once():
    v = generation_values(["  바다를   보았다\n\n등대  "])
    assert v["length_chars"].tolist() == [10.0]  # 바다를 + space + 보았다 + space + 등대
    assert v["length_words"].tolist() == [3.0]


def test_termination():
    sample = types.SimpleNamespace(stop_reason="stop_token")
    assert termination_values([sample, "max_new_tokens", "stop_token"]).tolist() == [1.0, 0.0, 1.0]
    assert termination_rate(["stop_token", "max_new_tokens", "max_new_tokens", "stop_token"]) == 0.5
    with pytest.raises(ValueError):
        termination_values(["length"])
    with pytest.raises(ValueError):
        termination_rate([])


def test_self_bleu_identical_and_disjoint():
    same = ["바다를 보았다 . 등대가 서 있었다"] * 3
    assert self_bleu_values(same).tolist() == pytest.approx([100.0] * 3)
    # No token in common: every n-gram precision is 0, so BLEU is 0.
    assert self_bleu(["가 나 다 라", "마 바 사 아", "자 차 카 타"]) == pytest.approx(0.0, abs=1e-9)
    assert self_bleu(["가 나 다 라", "마 바 사 아"], tokenize="char") == pytest.approx(0.0, abs=1e-9)


def test_self_bleu_hand_computed():
    # "a b c d" vs "a b c e": precisions 3/4, 2/3, 1/2 and 0/1, which exp smoothing makes 1/2;
    # equal lengths -> no brevity penalty. BLEU = 100 * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 100 * 0.125**0.25.
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx(100 * 0.125 ** 0.25)


@pytest.mark.parametrize("tokenize", ["13a", "char"])
def test_self_bleu_matches_sacrebleu_sentence_bleu(tokenize):
    outputs = [
        "바다를 건너온 바람이 등대를 흔들었다.\n등대는 말이 없었다.",
        "바다를 건너온 바람이 불었다. 등대는 말이 없었다.",
        "등대 등대 등대 등대 등대",
        "창문이 밤새 흔들렸다",
        "",
        "바다를 건너온 바람이 등대를 흔들었다.\n등대는 말이 없었다.",
        "짧다",
    ]
    expected = [sacrebleu.sentence_bleu(o, outputs[:i] + outputs[i + 1 :], tokenize=tokenize).score
                for i, o in enumerate(outputs)]
    assert self_bleu_values(outputs, tokenize=tokenize).tolist() == pytest.approx(expected, abs=1e-9)
    assert self_bleu(outputs, tokenize=tokenize) == pytest.approx(np.mean(expected))


def test_self_bleu_within_groups_and_too_few_outputs():
    x, y, z = "바다를 보았다 오래", "가 나 다 라", "마 바 사 아"
    # Within groups: x against x (100); y against z and z against y (0). Across all: y and z would see x.
    assert self_bleu_values([x, x, y, z], groups=["p1", "p1", "p2", "p2"]).tolist() == pytest.approx(
        [100.0, 100.0, 0.0, 0.0], abs=1e-9)
    v = self_bleu_values([x, x, y], groups=["p1", "p1", "p2"])  # p2 has no second sample
    assert v[:2].tolist() == pytest.approx([100.0, 100.0]) and math.isnan(v[2])
    assert math.isnan(self_bleu([x]))
    assert math.isnan(self_bleu([]))
    with pytest.raises(ValueError):
        self_bleu_values([x, y], groups=["p1"])


# =================================================================================================
# Preference accuracy


def test_preference_accuracy_ties_and_length_normalisation():
    chosen_lp, chosen_n = [-10.0, -20.0, -6.0], [10, 10, 3]
    rejected_lp, rejected_n = [-20.0, -20.0, -8.0], [10, 10, 8]
    # Per token: -1 vs -2 (win), -2 vs -2 (tie: not a win), -2 vs -1 (loss) -> 1/3.
    assert preference_wins(chosen_lp, chosen_n, rejected_lp, rejected_n).tolist() == [1.0, 0.0, 0.0]
    assert preference_accuracy(chosen_lp, chosen_n, rejected_lp, rejected_n) == pytest.approx(1 / 3)
    # Summed log-probs: -10 > -20 win, tie, -6 > -8 win -> 2/3: normalisation flips the third verdict.
    assert preference_accuracy(chosen_lp, chosen_n, rejected_lp, rejected_n,
                               length_normalized=False) == pytest.approx(2 / 3)
    # And the other way: a long chosen (-30 over 30 tokens = -1/token) beats a short rejected (-20 over 10 =
    # -2/token) only when normalised.
    assert preference_accuracy([-30.0], [30], [-20.0], [10]) == 1.0
    assert preference_accuracy([-30.0], [30], [-20.0], [10], length_normalized=False) == 0.0


def test_preference_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        preference_accuracy([-1.0], [0], [-1.0], [1])          # zero tokens
    with pytest.raises(ValueError):
        preference_accuracy([-1.0, -2.0], [1, 1], [-1.0], [1])  # lengths differ
    with pytest.raises(ValueError):
        preference_accuracy([float("nan")], [1], [-1.0], [1])
    with pytest.raises(ValueError):
        preference_accuracy([], [], [], [])


# =================================================================================================
# Bootstrap


def test_bootstrap_ci_contains_mean_and_matches_normal_approximation():
    values = np.tile([0.0, 1.0], 200)  # n = 400, mean 0.5, standard error sqrt(0.25 / 400) = 0.025
    mean, low, high = bootstrap_ci(values)
    assert mean == 0.5 and low < mean < high
    # Normal approximation: half-width 1.96 * 0.025 = 0.049.
    assert (high - low) / 2 == pytest.approx(0.049, abs=0.007)
    # A 50% interval is narrower: 0.674 * 0.025 = 0.017.
    _, low50, high50 = bootstrap_ci(values, alpha=0.5)
    assert (high50 - low50) / 2 == pytest.approx(0.0169, abs=0.004)


def test_bootstrap_ci_shrinks_with_more_data():
    _, lo_small, hi_small = bootstrap_ci(np.tile([0.0, 1.0], 10))    # n = 20
    _, lo_big, hi_big = bootstrap_ci(np.tile([0.0, 1.0], 1000))     # n = 2000: 10x narrower
    assert (hi_big - lo_big) < (hi_small - lo_small) / 5


def test_bootstrap_ci_seeded():
    values = np.sqrt(np.arange(1.0, 31.0))  # 30 distinct values, so quantiles differ between seeds
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci(values, seed=3)[0] == pytest.approx(values.mean())


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)
    assert bootstrap_ci([2.0]) == (2.0, 2.0, 2.0)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            bootstrap_ci(bad)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], alpha=0.0)


def test_grouped_bootstrap_resamples_prompts():
    # 40 prompts x 5 samples; each prompt's samples agree (all 0 or all 1). Treating the 200 samples as
    # independent gives half-width ~1.96 * sqrt(0.25/200) = 0.069; the truth has 40 independent units:
    # ~1.96 * sqrt(0.25/40) = 0.155 (resampled means move in steps of 1/40, hence the tolerance).
    groups = np.repeat(np.arange(40), 5)
    values = (groups % 2).astype(float)
    mean, low, high = grouped_bootstrap_ci(values, groups)
    _, plain_low, plain_high = bootstrap_ci(values)
    assert mean == 0.5 and low < mean < high
    assert (high - low) / 2 == pytest.approx(0.155, abs=0.03)
    assert (plain_high - plain_low) / 2 == pytest.approx(0.069, abs=0.012)


def test_grouped_bootstrap_pooled_mean_and_singletons():
    # Unequal groups: the estimate is the mean over samples (3/4), not over groups (1/2).
    mean, low, high = grouped_bootstrap_ci([1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"])
    assert mean == 0.75 and 0.0 <= low <= high <= 1.0
    # Two groups: a resample is {a,a} (mean 1), {b,b} (0) or {a,b} (3/4); P({b,b}) = 1/4 > 2.5%, so low = 0.
    assert low == 0.0 and high == 1.0
    # One sample per group is the ordinary bootstrap.
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    assert grouped_bootstrap_ci(values, ["p", "q", "r", "s", "t"], seed=7) == bootstrap_ci(values, seed=7)
    with pytest.raises(ValueError):
        grouped_bootstrap_ci(values, ["p", "q"])


def test_with_ci_drops_undefined_values():
    values = {"self_bleu": [100.0, 100.0, float("nan")], "prompt_echo": [1.0, 0.0, 1.0],
              "never": [float("nan")] * 3}
    out = with_ci(values, groups=["p1", "p1", "p2"])
    assert out["self_bleu"] == (100.0, 100.0, 100.0)
    assert out["prompt_echo"] == grouped_bootstrap_ci([1.0, 0.0, 1.0], ["p1", "p1", "p2"])
    assert all(math.isnan(x) for x in out["never"])
    assert with_ci({"x": [1.0, 3.0]})["x"] == bootstrap_ci([1.0, 3.0])


def test_reward_wins_hand_computed():
    # pair 1: policy gains 2 on chosen, loses 1 on rejected vs reference: margin 3 > 0
    # pair 2: both sides drop by 5: margin 0, a tie, no win; pair 3: chosen drops more: margin -2
    wins = reward_wins([-8.0, -15.0, -12.0], [-11.0, -25.0, -20.0], [-10.0, -10.0, -10.0],
                               [-10.0, -20.0, -20.0])
    np.testing.assert_array_equal(wins, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        reward_wins([np.nan], [0.0], [0.0], [0.0])
