"""Tests for the keyword-literature data set and the modules it rests on.

Sections: keyword presence (kwjax.keywords), repetition/diversity metrics (kwjax.metrics), the loader for
users' files (kwjax.data.load_records), and the shipped data set itself (kwjax.data.load_examples).
Expected values are worked out by hand in the comments, not taken from the code under test.
"""

from __future__ import annotations

import csv
import fnmatch
import itertools
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kwjax import data as kd
from kwjax.data import DataError, dpo_view, load_examples, load_records, sft_view
from kwjax.keywords import is_predicate, keyword_hits, keyword_present, surface_forms
from kwjax.metrics import distinct_n, mean_seq_rep_n, seq_rep_n, tokens_of

REPO = Path(__file__).resolve().parents[1]
LEVELS = ("surface", "morpheme")


# =================================================================================================
# Keyword presence


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    "text, keyword",
    [
        ("바다를 오래 바라보았다", "바다"),        # object particle 를
        ("바다에서 돌아온 사람", "바다"),          # locative particle 에서
        ("그 바다였다.", "바다"),                  # copula fused with the noun's last syllable
        ("바람에 흔들리는 갈대", "흔들리다"),      # adnominal ending 는
        ("창문이 밤새 흔들렸다", "흔들리다"),      # 리 + 었 contracts to 렸
        ("너를 기다리며 불을 켰다", "기다리다"),   # connective ending 며
        ("오래 기다린 편지", "기다리다"),          # 리 + ㄴ fuses into 린
        ("그를 사랑했다", "사랑하다"),             # 하다-verb: 하 + 였 -> 했
        ("강물이 흘러 바다로 간다", "흐르다"),     # 르-irregular: 흐르 + 어 -> 흘러
        ("추운 겨울밤", "춥다"),                   # ㅂ-irregular: 춥 + 은 -> 추운
        ("하얀 눈이 내렸다", "하얗다"),            # ㅎ-irregular: 하얗 + ㄴ -> 하얀
        ("아이가 잠든 방", "잠들다"),              # ㄹ drops before ㄴ: 잠들 + ㄴ -> 잠든
    ],
)
def test_keyword_found_through_particles_and_endings(text, keyword, level):
    assert keyword_present(text, keyword, level=level)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    "text, keyword",
    [
        ("파도가 밀려왔다", "바다"),
        ("바람이 분다", "흔들리다"),
        ("사랑이라는 말", "사랑하다"),   # the noun alone is not the verb
        ("조용히 걸었다", "조용하다"),   # the adverb 조용히 is not the adjective
    ],
)
def test_keyword_absent(text, keyword, level):
    assert not keyword_present(text, keyword, level=level)


def test_levels_differ_on_compound_modifiers():
    # 눈물 contains the string 눈 (surface hit) but its head is 물: tears are not snow or eyes.
    assert keyword_present("눈물이 흘렀다", "눈", level="surface")
    assert not keyword_present("눈물이 흘렀다", "눈", level="morpheme")
    # 밤바다 is a kind of 바다 (right-headed compound): present at both levels.
    assert keyword_present("밤바다가 운다", "바다", level="morpheme")


def test_kind_inference_keeps_nouns_ending_in_da():
    assert not is_predicate("바다")          # ends in 다 but is a noun
    assert is_predicate("흔들리다")
    assert is_predicate("바다", "verb")       # an explicit kind wins
    assert not is_predicate("흔들리다", "concrete")
    with pytest.raises(ValueError):
        is_predicate("바다", "colour")


def test_surface_forms_of_a_regular_verb():
    # 기다리 + {ㄴ, ㄹ, ㅁ, ㅂ} finals and the contraction 리+어 -> 려 (past 렸), written out by hand.
    assert {"기다리", "기다린", "기다릴", "기다림", "기다립", "기다려", "기다렸"} <= surface_forms("기다리다")
    assert surface_forms("바다") == {"바다"}


def test_keyword_hits_order_and_levels():
    text = "바다에서 기다리며 흔들리는 배를 보았다"
    assert keyword_hits(text, ["바다", "기다리다", "별"], "surface") == [True, True, False]
    assert keyword_hits(text, ["별", "흔들리다", "바다"], "morpheme") == [False, True, True]
    with pytest.raises(ValueError):
        keyword_present(text, "바다", level="fuzzy")


def test_kiwi_reads_lines_separately():
    # Read as one string, Kiwi joins 있다⏎고요는 into 있+다+이+고+요+는 and loses the noun 고요.
    assert keyword_present("고양이가 졸고 있다\n고요는 소리가 없는 것", "고요", level="morpheme")


# =================================================================================================
# Metrics


def test_seq_rep_n_hand_computed():
    # words a b c d a b c d: 4-grams abcd bcda cdab dabc abcd -> 5 total, 4 unique -> 1 - 4/5
    assert seq_rep_n("a b c d a b c d", n=4) == pytest.approx(0.2)
    # 바다 ×3, unigrams: 3 total, 1 unique -> 1 - 1/3
    assert seq_rep_n("바다 바다 바다", n=1) == pytest.approx(2 / 3)
    # no repeats
    assert seq_rep_n("하나 둘 셋 넷 다섯", n=2) == 0.0
    # fewer tokens than n: no n-grams, defined as 0
    assert seq_rep_n("하나 둘", n=4) == 0.0


def test_seq_rep_n_units_and_tokens():
    # characters 가나가나가: bigrams 가나 나가 가나 나가 -> 4 total, 2 unique -> 0.5
    assert seq_rep_n("가나가나가", n=2, unit="char") == pytest.approx(0.5)
    # as one word there is a single token, so no bigram at all
    assert seq_rep_n("가나가나가", n=2, unit="word") == 0.0
    # pre-tokenised ids: [1,1,1,1] bigrams (1,1)×3 -> 1 - 1/3
    assert seq_rep_n([1, 1, 1, 1], n=2) == pytest.approx(2 / 3)
    # whitespace runs collapse to one space in char mode: "a  b" -> a, ' ', b
    assert tokens_of("a  b\n", unit="char") == ["a", " ", "b"]
    with pytest.raises(ValueError):
        tokens_of("a", unit="syllable")


def test_mean_seq_rep_n():
    # 0.2 (first) and 0 (second) -> mean 0.1
    assert mean_seq_rep_n(["a b c d a b c d", "a b c d e"], n=4) == pytest.approx(0.1)


def test_distinct_n_hand_computed():
    # unigrams a b | a c -> 4 total, {a,b,c} 3 unique
    assert distinct_n(["a b", "a c"], 1) == pytest.approx(0.75)
    # bigrams (a b) | (a c) -> 2 total, 2 unique
    assert distinct_n(["a b", "a c"], 2) == pytest.approx(1.0)
    # two identical outputs: bigrams (x y) ×2 -> 1/2; pooling across outputs is the point
    assert distinct_n(["x y", "x y"], 2) == pytest.approx(0.5)
    assert distinct_n(["혼자"], 2) == 0.0


# =================================================================================================
# Loader for users' files

SFT_ROWS = [
    {"input": "바다, 별, 꿈으로 시를 써 줘", "output": "별이 바다에 꿈처럼 내린다", "keywords": ["바다", "별", "꿈"]},
    {"input": "비, 우산, 이별로 짧은 글", "output": "비 오는 날 우산을 접고 이별을 했다"},
]
DPO_ROWS = [
    {"prompt": "바다, 별, 꿈", "chosen": "별이 바다에 꿈처럼 내린다", "rejected": "바다 별 꿈", "keywords": ["바다", "별", "꿈"]},
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, header, rows) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _assert_error(exc_info, *parts):
    msg = str(exc_info.value)
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


def test_load_jsonl_sft(tmp_path):
    recs = load_records(_write_jsonl(tmp_path / "a.jsonl", SFT_ROWS), "sft")
    assert [r["output"] for r in recs] == ["별이 바다에 꿈처럼 내린다", "비 오는 날 우산을 접고 이별을 했다"]
    assert recs[0]["keywords"] == ["바다", "별", "꿈"]
    # no keywords field: the three the prompt "비, 우산, 이별로 짧은 글" names (이별로 -> 이별)
    assert recs[1]["keywords"] == ["비", "우산", "이별"]
    assert recs[1]["id"] == "a.jsonl#2"


def test_load_json_list_dpo(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(DPO_ROWS, ensure_ascii=False), encoding="utf-8")
    (rec,) = load_records(p, "dpo")
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == ("바다, 별, 꿈", "별이 바다에 꿈처럼 내린다", "바다 별 꿈")


def test_load_csv_with_comma_separated_keywords(tmp_path):
    p = _write_csv(tmp_path / "a.csv", ["input", "output", "keywords"],
                   [["바다, 별, 꿈", "별이\n바다에 내린다", "바다, 별 ,꿈"], ["비", "비가 온다", ""]])
    recs = load_records(p, "sft")
    assert recs[0]["keywords"] == ["바다", "별", "꿈"]
    assert recs[0]["output"] == "별이\n바다에 내린다"  # a quoted multi-line cell stays one row
    assert recs[1]["keywords"] is None


def test_load_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list(DPO_ROWS * 2).save_to_disk(str(d))
    recs = load_records(d, "dpo")
    assert len(recs) == 2 and recs[1]["keywords"] == ["바다", "별", "꿈"]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(DPO_ROWS)}).save_to_disk(str(dd))
    with pytest.raises(DataError) as e:
        load_records(dd, "dpo")
    _assert_error(e, "dd", "split")
    assert len(load_records(dd, "dpo", split="train")) == 1


@pytest.mark.parametrize(
    "row, field, expected",
    [
        ({"input": "x"}, "output", "missing field"),
        ({"input": "x", "output": 3}, "output", "expected a string"),
        ({"input": "x", "output": "   "}, "output", "empty string"),
        ({"input": "x", "output": "y", "keywords": "바다, 별"}, "keywords", "list of strings"),
        ({"input": "x", "output": "y", "keywords": ["바다", 7]}, "keywords", "item 1"),
        ({"input": "x", "output": "y", "keywords": []}, "keywords", "empty list"),
    ],
)
def test_jsonl_bad_row_names_file_line_field(tmp_path, row, field, expected):
    p = _write_jsonl(tmp_path / "bad.jsonl", [SFT_ROWS[0], row])
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "bad.jsonl", "line 2", f"field '{field}'", expected)
    assert e.value.field == field and e.value.where == "line 2"


def test_jsonl_malformed_json_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(SFT_ROWS[0], ensure_ascii=False) + "\n\n{\"input\": \"x\", \"output\": }\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "bad.jsonl", "line 3", "malformed JSON")  # the blank line 2 still counts as a line


def test_jsonl_row_not_an_object(tmp_path):
    p = _write_jsonl(tmp_path / "bad.jsonl", [["x", "y"]])
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "line 1", "expected an object")


def test_dpo_file_loaded_as_sft_gives_prompt_and_chosen(tmp_path):
    # One file serves SFT then DPO: as SFT a preference row is its prompt and chosen response (this used
    # to be refused with "load it with kind='dpo'"). The reverse stays an error.
    p = _write_jsonl(tmp_path / "pairs.jsonl", DPO_ROWS)
    assert load_records(p, "sft") == [{"id": "pairs.jsonl#1", "input": "바다, 별, 꿈", "output": "별이 바다에 꿈처럼 내린다",
                                       "keywords": ["바다", "별", "꿈"]}]
    p = _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    with pytest.raises(DataError) as e:
        load_records(p, "dpo")
    _assert_error(e, "sft.jsonl", "line 1", "field 'prompt'", "kind='sft'")


def test_json_list_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([DPO_ROWS[0], {"prompt": "p", "chosen": "c"}]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "dpo")
    _assert_error(e, "bad.json", "row 2", "field 'rejected'", "missing field")

    p.write_text('[\n  {"prompt": "p",\n   "chosen": "c" "rejected": "r"}\n]', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "dpo")
    _assert_error(e, "bad.json", "line 3", "malformed JSON")

    p.write_text(json.dumps(DPO_ROWS[0]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "dpo")
    _assert_error(e, "bad.json", "expected a JSON list")


def test_csv_errors(tmp_path):
    p = _write_csv(tmp_path / "bad.csv", ["input", "keywords"], [["x", "a,b"]])
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "bad.csv", "row 1", "field 'output'", "missing field")

    p = _write_csv(tmp_path / "bad.csv", ["input", "output"], [["x", "y"], ["x", ""]])
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "bad.csv", "row 2 (line 3)", "field 'output'", "empty string")

    p.write_text("input,output\nx,y,z\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "bad.csv", "row 1", "more cells")

    p.write_text("input,output\nx\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "bad.csv", "row 1", "field 'output'", "fewer cells")


def test_datasets_bad_row_names_index(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list([{"input": "x", "output": "y"}, {"input": "x", "output": None}]).save_to_disk(str(d))
    with pytest.raises(DataError) as e:
        load_records(d, "sft")
    _assert_error(e, "ds", "index 1", "field 'output'", "expected a string")


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "input,output\n")])
def test_empty_files(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, name, "empty")


def test_empty_json_file_is_malformed(tmp_path):
    p = tmp_path / "e.json"
    p.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "e.json", "line 1", "malformed JSON")


def test_unknown_extension_and_missing_file(tmp_path):
    p = tmp_path / "rows.txt"
    p.write_text("x", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "rows.txt", "unknown file extension '.txt'")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.jsonl", "sft")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(DataError) as e:
        load_records(plain_dir, "sft")
    _assert_error(e, "plain", "not a datasets save_to_disk directory")
    with pytest.raises(ValueError):
        load_records(p, "rlhf")


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes('{"input": "café", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_records(p, "sft")
    _assert_error(e, "latin.jsonl", "UTF-8")


def test_shipped_schema_errors(tmp_path):
    good = {"id": "x-1", "split": "train", "keywords": ["바다", "별", "꿈"], "keyword_kinds": ["concrete"] * 3,
            "form": "poem", "failure_mode": "repetition", "instruction": "i", "chosen": "c", "rejected": "r"}
    p = _write_jsonl(tmp_path / "ex.jsonl", [good, {**good, "id": "x-2", "failure_mode": "boring"}])
    with pytest.raises(DataError) as e:
        load_examples(p)
    _assert_error(e, "ex.jsonl", "line 2", "field 'failure_mode'", "boring")
    p = _write_jsonl(tmp_path / "ex.jsonl", [good, good])
    with pytest.raises(DataError) as e:
        load_examples(p)
    _assert_error(e, "line 2", "duplicate id")
    p = _write_jsonl(tmp_path / "ex.jsonl", [{**good, "keywords": ["바다", "별"]}])
    with pytest.raises(DataError) as e:
        load_examples(p)
    _assert_error(e, "line 1", "field 'keywords'", "3 keywords")


# =================================================================================================
# The shipped data set


@pytest.fixture(scope="module")
def rows():
    return load_examples()


def _lines(text: str) -> list[str]:
    # Independent of scripts/data_card.py: verse lines, and prose split after sentence-final punctuation.
    out = []
    for line in text.split("\n"):
        out += [s for s in re.split(r"(?<=[.!?…])\s+", line.strip()) if s]
    return out


def test_size_split_ids(rows):
    assert len(rows) == 175
    assert [r.id for r in rows] == [f"kl-{i:03d}" for i in range(1, 176)]
    assert Counter(r.split for r in rows) == {"train": 140, "validation": 35}
    assert len(load_examples(split="train")) == 140 and len(load_examples(split="validation")) == 35


def test_split_is_stratified_by_failure_mode(rows):
    for mode in kd.FAILURE_MODES:
        rs = [r for r in rows if r.failure_mode == mode]
        n_val = sum(r.split == "validation" for r in rs)
        assert abs(n_val - len(rs) / 5) <= 1, (mode, n_val, len(rs))
    # and within failure modes by form, so validation has the data set's poem/prose mix (±1 per mode)
    n_poems = sum(r.form == "poem" for r in rows)
    val_poems = sum(r.form == "poem" for r in rows if r.split == "validation")
    assert abs(val_poems - n_poems / 5) <= len(kd.FAILURE_MODES) / 2, (val_poems, n_poems)


def test_views_come_from_the_same_rows(rows):
    sft, dpo = sft_view(rows), dpo_view(rows)
    assert [s["id"] for s in sft] == [d["id"] for d in dpo] == [r.id for r in rows]
    for s, d, r in zip(sft, dpo, rows):
        assert s["input"] == d["prompt"] == r.instruction
        assert s["output"] == d["chosen"] == r.chosen
        assert d["rejected"] == r.rejected
        assert s["keywords"] == d["keywords"] == list(r.keywords)


def test_every_chosen_has_all_keywords_at_both_levels(rows):
    misses = [(r.id, level, k) for r in rows for level in LEVELS
              for k, hit in zip(r.keywords, keyword_hits(r.chosen, r.keywords, level, r.keyword_kinds)) if not hit]
    assert misses == []


def test_every_instruction_names_its_keywords(rows):
    misses = [(r.id, k) for r in rows
              for k, hit in zip(r.keywords, keyword_hits(r.instruction, r.keywords, "surface", r.keyword_kinds)) if not hit]
    assert misses == []


def test_rejected_differs_from_chosen(rows):
    assert [r.id for r in rows if " ".join(r.rejected.split()) == " ".join(r.chosen.split())] == []


def test_missing_keyword_rows_miss_exactly_one(rows):
    bad = []
    for r in (r for r in rows if r.failure_mode == "missing_keyword"):
        hits = [keyword_hits(r.rejected, r.keywords, level, r.keyword_kinds) for level in LEVELS]
        if hits[0] != hits[1] or sum(hits[0]) != 2:
            bad.append((r.id, r.keywords, hits))
    assert bad == []


def test_repetition_rows_repeat_far_more_than_any_chosen(rows):
    # Bar: above the most repetitive chosen passage AND at least 0.3, the low end of what greedy decoding of
    # small LMs produces (human text is near 0.01; Welleck et al. 2020).
    bar = max(max(seq_rep_n(r.chosen, 4) for r in rows), 0.3)
    weak = [(r.id, round(seq_rep_n(r.rejected, 4), 3)) for r in rows
            if r.failure_mode == "repetition" and seq_rep_n(r.rejected, 4) <= bar]
    assert weak == []


def test_other_failure_modes_are_what_they_say(rows):
    for r in rows:
        n_hits = sum(keyword_hits(r.rejected, r.keywords, "surface", r.keyword_kinds))
        if r.failure_mode == "too_short":
            assert len(r.rejected) < 0.25 * len(r.chosen), r.id
        elif r.failure_mode == "off_topic":
            assert n_hits <= 1, r.id  # about something else: at most one keyword in passing
        elif r.failure_mode in ("keyword_list", "flat_prose"):
            assert n_hits == 3, r.id  # the keywords are there; the writing is what fails


def test_no_duplicate_keyword_triples(rows):
    triples = Counter(frozenset(r.keywords) for r in rows)
    assert [sorted(t) for t, n in triples.items() if n > 1] == []
    assert all(len(set(r.keywords)) == 3 for r in rows)


def _char_5grams(text: str) -> set[str]:
    t = " ".join(text.split())
    return {t[i : i + 5] for i in range(len(t) - 4)}


def test_char_5gram_jaccard_by_hand():
    # "abcdef" -> {abcde, bcdef}; "abcdeX" -> {abcde, bcdeX}: 1 shared of 3 -> 1/3
    a, b = _char_5grams("abcdef"), _char_5grams("abcdeX")
    assert len(a & b) / len(a | b) == pytest.approx(1 / 3)


def test_no_near_duplicate_chosen_passages(rows):
    grams = [_char_5grams(r.chosen) for r in rows]
    close = [(rows[i].id, rows[j].id) for i, j in itertools.combinations(range(len(rows)), 2)
             if len(grams[i] & grams[j]) / len(grams[i] | grams[j]) >= 0.5]
    assert close == []


def _frame(line: str, keywords) -> str:
    """A line with its keywords masked and punctuation dropped: what a template would share."""
    for k in sorted(keywords, key=len, reverse=True):
        line = line.replace(k, "◇")
        if k.endswith("다") and len(k) > 2:
            line = line.replace(k[:-1], "◇")
    return " ".join(re.sub(r"[^\w◇\s]", "", line).split())


def shared_frames(passages, limit: int = 3) -> dict[str, int]:
    """First/last-line frames used by more than ``limit`` passages; ``passages`` is [(text, keywords)]."""
    counts = Counter()
    for text, kws in passages:
        lines = _lines(text)
        counts[("first", _frame(lines[0], kws))] += 1
        counts[("last", _frame(lines[-1], kws))] += 1
    return {f"{pos}: {frame}": n for (pos, frame), n in counts.items() if n > limit}


def test_frame_check_catches_a_template():
    fill = [("바다", "별", "꿈"), ("비", "우산", "이별"), ("달", "창문", "그리움"), ("눈", "장갑", "약속"),
            ("섬", "등대", "고독")]
    templated = [(f"오늘 나는 {a}를 보았다.\n{i}번째 줄은 저마다 다르다, {b}처럼.\n그래서 {c}는 내 마음에 남았다.", (a, b, c))
                 for i, (a, b, c) in enumerate(fill)]
    found = shared_frames(templated)
    assert found == {"first: 오늘 나는 ◇를 보았다": 5, "last: 그래서 ◇는 내 마음에 남았다": 5}
    half = [(f"{a}가 먼저 왔다.\n중간 {i}\n{c}로 끝났다 {i}", (a, b, c)) for i, (a, b, c) in enumerate(fill)]
    assert shared_frames(half) == {"first: ◇가 먼저 왔다": 5}  # the first line is still a template


def test_chosen_passages_are_not_templated(rows):
    assert shared_frames([(r.chosen, r.keywords) for r in rows]) == {}


def test_instructions_vary(rows):
    frames = Counter(_frame(r.instruction, r.keywords) for r in rows)
    assert len(frames) >= 140, f"only {len(frames)} distinct instruction frames"
    assert frames.most_common(1)[0][1] <= 5, frames.most_common(3)


def test_kinds_forms_and_predicates_consistent(rows):
    for r in rows:
        for k, kind in zip(r.keywords, r.keyword_kinds):
            if kind in ("verb", "adjective"):
                assert k.endswith("다"), (r.id, k)  # dictionary form
    assert {r.form for r in rows} == set(kd.FORMS)
    assert {r.failure_mode for r in rows} == set(kd.FAILURE_MODES)


def test_source_file_ships_with_the_package():
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    conf = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = conf["tool"]["setuptools"]["package-data"]["kwjax"]
    rel = kd.SOURCE_PATH.relative_to(REPO / "kwjax").as_posix()
    assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)
    assert kd.SOURCE_PATH.is_file()


def test_data_card_is_up_to_date():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "data_card.py"), "--check"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


# =================================================================================================
# Which rows a run trains and validates on (kwjax.data.split_rows / validation_rows)


def _tiny_config():
    import runpy

    return runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()


def test_split_rows_default_is_the_shipped_split_cut_to_the_limits():
    c = _tiny_config()  # train_limit 16, eval_limit 8, no files
    train_ids = [e.id for e in load_examples(split="train")]
    val_ids = [e.id for e in load_examples(split="validation")]
    for kind, fields in (("sft", {"input", "output"}), ("dpo", {"prompt", "chosen", "rejected"})):
        train, evals = kd.split_rows(c, kind)
        assert [r["id"] for r in train] == train_ids[:16]
        assert [r["id"] for r in evals] == val_ids[:8]
        assert fields <= set(train[0]) and fields <= set(evals[0])


def test_split_rows_reads_the_configured_files(tmp_path):
    c = _tiny_config()
    c.data.train_file = str(_write_jsonl(tmp_path / "train.jsonl", DPO_ROWS * 3))
    c.data.eval_file = str(_write_jsonl(tmp_path / "val.jsonl", DPO_ROWS))
    train, evals = kd.split_rows(c, "dpo")
    assert [r["id"] for r in train] == ["train.jsonl#1", "train.jsonl#2", "train.jsonl#3"]
    assert [r["id"] for r in evals] == ["val.jsonl#1"]
    assert evals[0]["chosen"] == DPO_ROWS[0]["chosen"]
    c.data.eval_file = ""
    assert kd.split_rows(c, "dpo")[1] == []  # a user's train file never pairs with the shipped validation


def test_validation_rows_file_else_shipped_validation(tmp_path):
    c = _tiny_config()
    shipped = dpo_view(load_examples(split="validation"))
    assert kd.validation_rows(c) == shipped
    assert kd.validation_rows(c, limit=3) == shipped[:3]
    c.data.eval_file = str(_write_jsonl(tmp_path / "val.jsonl", DPO_ROWS * 2))
    assert [r["id"] for r in kd.validation_rows(c, "dpo", 1)] == ["val.jsonl#1"]
    assert kd.shipped_or_file_rows(None, "sft", "train") == sft_view(load_examples(split="train"))
