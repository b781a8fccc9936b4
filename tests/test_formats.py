"""kwjax.data.load_records on the data formats TRL users bring (docs/DATA_FORMATS.md).

Each test writes a small file and compares what load_records returns with records written out by hand;
nothing expected is computed by kwjax. No model and no JAX computation: these are fast.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from kwjax.data import DataError, load_examples, load_records
from kwjax.prompt_keywords import keywords_from_prompt

SYS = {"role": "system", "content": "너는 시인이다."}


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# 1. kwjax's own shapes


def test_kwjax_input_output_and_prompt_chosen_rejected(tmp_path):
    sft = _jsonl(tmp_path / "sft.jsonl", [{"id": "a", "input": "바다, 별, 꿈으로 시", "output": "별이 내린다"}])
    assert load_records(sft, "sft") == [{"id": "a", "input": "바다, 별, 꿈으로 시", "output": "별이 내린다",
                                         "keywords": ["바다", "별", "꿈"]}]
    dpo = _jsonl(tmp_path / "dpo.jsonl", [{"prompt": "시를 써 줘", "chosen": "좋은 시", "rejected": "나쁜 시",
                                           "keywords": ["시"]}])
    assert load_records(dpo, "dpo") == [{"id": "dpo.jsonl#1", "prompt": "시를 써 줘", "chosen": "좋은 시",
                                         "rejected": "나쁜 시", "keywords": ["시"]}]


# --------------------------------------------------------------------------------------------------
# 2. TRL prompt-completion, standard and conversational


def test_prompt_completion(tmp_path):
    p = _jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "섬, 자전거, 흔들리다를 넣어 시를 써 줘", "completion": "섬을 도는 자전거가 흔들린다"},
        {"prompt": [_user("등대, 귤, 고독으로 시")], "completion": [_bot("등대 아래 귤 하나")]},
        {"prompt": [SYS, _user("짧은 시 하나")], "completion": [_bot("짧다")], "keywords": ["시"]},
    ])
    assert load_records(p, "sft") == [
        {"id": "pc.jsonl#1", "input": "섬, 자전거, 흔들리다를 넣어 시를 써 줘", "output": "섬을 도는 자전거가 흔들린다",
         "keywords": ["섬", "자전거", "흔들리다"]},
        {"id": "pc.jsonl#2", "input": "등대, 귤, 고독으로 시", "output": "등대 아래 귤 하나", "keywords": ["등대", "귤", "고독"]},
        {"id": "pc.jsonl#3", "input": "너는 시인이다.\n\n짧은 시 하나", "output": "짧다", "keywords": ["시"]},
    ]


# --------------------------------------------------------------------------------------------------
# 3. TRL conversational language modeling: messages


def test_messages(tmp_path):
    p = _jsonl(tmp_path / "chat.jsonl", [
        {"messages": [_user("'파도' '국수' '안부' 넣고 시 하나만"), _bot("국수 위로 파도가 친다")]},
        {"messages": [SYS, _user("  노을, 멸치, 붉다. 이걸로 시  "), _bot("붉은 멸치")], "id": "m2"},
    ])
    assert load_records(p, "sft") == [
        {"id": "chat.jsonl#1", "input": "'파도' '국수' '안부' 넣고 시 하나만", "output": "국수 위로 파도가 친다",
         "keywords": ["파도", "국수", "안부"]},
        # the system text, a blank line, the user text (trimmed, as Gemma's template trims it)
        {"id": "m2", "input": "너는 시인이다.\n\n노을, 멸치, 붉다. 이걸로 시", "output": "붉은 멸치",
         "keywords": ["노을", "멸치", "붉다"]},
    ]


# --------------------------------------------------------------------------------------------------
# 4. Preference rows with message lists: explicit and implicit prompt


def test_dpo_conversational_explicit_prompt(tmp_path):
    p = _jsonl(tmp_path / "pref.jsonl", [
        {"prompt": [_user("안개, 전화기, 망각으로 시")], "chosen": [_bot("안개 속 전화기")], "rejected": [_bot("망각")]},
        {"prompt": "구름, 빨래, 게으름으로 시", "chosen": [_bot("빨래 위 구름")], "rejected": "게으름"},
    ])
    assert load_records(p, "dpo") == [
        {"id": "pref.jsonl#1", "prompt": "안개, 전화기, 망각으로 시", "chosen": "안개 속 전화기", "rejected": "망각",
         "keywords": ["안개", "전화기", "망각"]},
        {"id": "pref.jsonl#2", "prompt": "구름, 빨래, 게으름으로 시", "chosen": "빨래 위 구름", "rejected": "게으름",
         "keywords": ["구름", "빨래", "게으름"]},
    ]


def test_dpo_implicit_prompt(tmp_path):
    p = _jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": [_user("돛, 열쇠, 자유를 다 써서 시"), _bot("돛에 열쇠를 건다")],
         "rejected": [_user("돛, 열쇠, 자유를 다 써서 시"), _bot("자유")]},
        {"chosen": [SYS, _user("시 하나"), _bot("좋은 시")], "rejected": [SYS, _user("시 하나"), _bot("나쁜 시")],
         "keywords": ["시"]},
    ])
    assert load_records(p, "dpo") == [
        {"id": "implicit.jsonl#1", "prompt": "돛, 열쇠, 자유를 다 써서 시", "chosen": "돛에 열쇠를 건다", "rejected": "자유",
         "keywords": ["돛", "열쇠", "자유"]},
        {"id": "implicit.jsonl#2", "prompt": "너는 시인이다.\n\n시 하나", "chosen": "좋은 시", "rejected": "나쁜 시",
         "keywords": ["시"]},
    ]


# --------------------------------------------------------------------------------------------------
# 5. Alpaca


def test_alpaca_keeps_instruction_and_input(tmp_path):
    p = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "다음 단어로 시를 써 줘.", "input": "부두, 라디오, 깊다", "output": "부두의 라디오"},
        {"instruction": "빗방울, 유리창, 기다리다로 시를 써 줘.", "output": "유리창의 빗방울"},
        {"instruction": "짧은 시를 써 줘.", "input": "", "output": "짧다"},
    ])
    assert load_records(p, "sft") == [
        {"id": "alpaca.jsonl#1", "input": "다음 단어로 시를 써 줘.\n\n부두, 라디오, 깊다", "output": "부두의 라디오",
         "keywords": ["부두", "라디오", "깊다"]},
        {"id": "alpaca.jsonl#2", "input": "빗방울, 유리창, 기다리다로 시를 써 줘.", "output": "유리창의 빗방울",
         "keywords": ["빗방울", "유리창", "기다리다"]},
        {"id": "alpaca.jsonl#3", "input": "짧은 시를 써 줘.", "output": "짧다", "keywords": None},
    ]


def test_alpaca_csv(tmp_path):
    p = tmp_path / "alpaca.csv"
    with p.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["instruction", "input", "output"], ["시를 써 줘.", "달, 별, 꿈", "달과 별"]])
    assert load_records(p, "sft") == [{"id": "alpaca.csv#1", "input": "시를 써 줘.\n\n달, 별, 꿈", "output": "달과 별",
                                       "keywords": ["달", "별", "꿈"]}]


# --------------------------------------------------------------------------------------------------
# 6. A preference file read for SFT (and the reverse refused)


def test_dpo_file_as_sft(tmp_path):
    p = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "바다, 별, 꿈으로 시", "chosen": "별이 내린다", "rejected": "바다"},
        {"prompt": [_user("시 하나")], "chosen": [_bot("좋은 시")], "rejected": [_bot("나쁜 시")], "keywords": ["시"]},
        {"chosen": [_user("시 둘"), _bot("좋은 둘")], "rejected": [_user("시 둘"), _bot("나쁜 둘")], "keywords": ["둘"]},
    ])
    assert load_records(p, "sft") == [
        {"id": "pairs.jsonl#1", "input": "바다, 별, 꿈으로 시", "output": "별이 내린다", "keywords": ["바다", "별", "꿈"]},
        {"id": "pairs.jsonl#2", "input": "시 하나", "output": "좋은 시", "keywords": ["시"]},
        {"id": "pairs.jsonl#3", "input": "시 둘", "output": "좋은 둘", "keywords": ["둘"]},
    ]


@pytest.mark.parametrize("row, field", [
    ({"input": "시", "output": "좋은 시"}, "prompt"),
    ({"prompt": "시", "completion": "좋은 시"}, "chosen"),
    ({"messages": [_user("시"), _bot("좋은 시")]}, "prompt"),
    ({"instruction": "시", "output": "좋은 시"}, "prompt"),
])
def test_sft_row_as_dpo_is_an_error(tmp_path, row, field):
    p = _jsonl(tmp_path / "sft.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_records(p, "dpo")
    _assert_names(e, "sft.jsonl", "line 1", field)
    assert "kind='sft'" in str(e.value)


# --------------------------------------------------------------------------------------------------
# 7. The shipped schema as a user's file


SHIPPED_STYLE = [
    {"id": "kl-004", "split": "train", "keywords": ["갈매기", "영수증", "체념"],
     "keyword_kinds": ["concrete", "concrete", "abstract"], "form": "prose", "failure_mode": "too_short",
     "instruction": "갈매기, 영수증, 체념이라는 단어로 담담한 분위기의 산문시를 써 주실 수 있나요?",
     "chosen": "갈매기 한 마리가 영수증을 물고 간다. 나는 그것을 체념이라 부르려다 그만둔다.",
     "rejected": "갈매기가 영수증을 물고 갔다."},
    {"id": "kl-010", "split": "validation", "keywords": ["그물", "달력", "젖다"],
     "keyword_kinds": ["concrete", "concrete", "verb"], "form": "prose", "failure_mode": "too_short",
     "instruction": "그물, 달력, 젖다 — 이 세 낱말로 산문시를 써 주시겠어요?",
     "chosen": "아버지의 달력에는 물때가 적혀 있었고, 마루 끝에는 젖은 그물이 널렸다.",
     "rejected": "젖은 그물."},
]


def test_shipped_schema_as_user_file(tmp_path):
    p = _jsonl(tmp_path / "mine.jsonl", SHIPPED_STYLE)
    # the whole file is used: the rows' split field is ignored
    assert load_records(p, "sft") == [
        {"id": "kl-004", "input": "갈매기, 영수증, 체념이라는 단어로 담담한 분위기의 산문시를 써 주실 수 있나요?",
         "output": "갈매기 한 마리가 영수증을 물고 간다. 나는 그것을 체념이라 부르려다 그만둔다.",
         "keywords": ["갈매기", "영수증", "체념"]},
        {"id": "kl-010", "input": "그물, 달력, 젖다 — 이 세 낱말로 산문시를 써 주시겠어요?",
         "output": "아버지의 달력에는 물때가 적혀 있었고, 마루 끝에는 젖은 그물이 널렸다.",
         "keywords": ["그물", "달력", "젖다"]},
    ]
    assert load_records(p, "dpo") == [
        {"id": "kl-004", "prompt": "갈매기, 영수증, 체념이라는 단어로 담담한 분위기의 산문시를 써 주실 수 있나요?",
         "chosen": "갈매기 한 마리가 영수증을 물고 간다. 나는 그것을 체념이라 부르려다 그만둔다.",
         "rejected": "갈매기가 영수증을 물고 갔다.", "keywords": ["갈매기", "영수증", "체념"]},
        {"id": "kl-010", "prompt": "그물, 달력, 젖다 — 이 세 낱말로 산문시를 써 주시겠어요?",
         "chosen": "아버지의 달력에는 물때가 적혀 있었고, 마루 끝에는 젖은 그물이 널렸다.",
         "rejected": "젖은 그물.", "keywords": ["그물", "달력", "젖다"]},
    ]


def test_formats_mixed_in_one_file(tmp_path):
    p = _jsonl(tmp_path / "mixed.jsonl", [
        {"input": "a", "output": "b", "keywords": ["a"]},
        {"prompt": "c", "completion": "d", "keywords": ["c"]},
        {"messages": [_user("e"), _bot("f")], "keywords": ["e"]},
        {"instruction": "g", "input": "h", "output": "i", "keywords": ["g"]},
        {"prompt": "j", "chosen": "k", "rejected": "l", "keywords": ["j"]},
    ])
    assert load_records(p, "sft") == [
        {"id": "mixed.jsonl#1", "input": "a", "output": "b", "keywords": ["a"]},
        {"id": "mixed.jsonl#2", "input": "c", "output": "d", "keywords": ["c"]},
        {"id": "mixed.jsonl#3", "input": "e", "output": "f", "keywords": ["e"]},
        {"id": "mixed.jsonl#4", "input": "g\n\nh", "output": "i", "keywords": ["g"]},
        {"id": "mixed.jsonl#5", "input": "j", "output": "k", "keywords": ["j"]},
    ]


# --------------------------------------------------------------------------------------------------
# 8. Keywords from the prompt, and the warning when there are none


@pytest.mark.parametrize("prompt, expected", [
    ("'항구', '우체통', '그리움'이 들어간 시를 한 편 써 주세요.", ["항구", "우체통", "그리움"]),
    ("장마 / 재봉틀 / 침묵\n세 단어 다 넣어서 산문시 하나 써줄래?", ["장마", "재봉틀", "침묵"]),
    ("다음 단어를 모두 넣어서 짧은 시를 지어줘: 섬, 자전거, 흔들리다", ["섬", "자전거", "흔들리다"]),
    ("갈매기, 영수증, 체념이라는 단어로 담담한 분위기의 산문시를 써 주실 수 있나요?", ["갈매기", "영수증", "체념"]),
    ("밀물·운동화·용서를 소재로 한 짧은 글을 부탁드립니다.", ["밀물", "운동화", "용서"]),
    ("어시장 할머니 새벽 이 단어들 넣어서 시 좀 써줘", ["어시장", "할머니", "새벽"]),
    ("나룻배와 안경, 그리고 세월. 이 단어들로 잔잔한 시를 부탁드려요.", ["나룻배", "안경", "세월"]),
    ("빗물이랑 장화, 첫사랑 넣어서 풋풋한 산문시 하나 써 줘!", ["빗물", "장화", "첫사랑"]),
    ("방파제와 사진과 청춘을 엮어 회고적인 산문시를 써 주십시오.", ["방파제", "사진", "청춘"]),
    ("다음 키워드로 산문시를 써 주세요.\n1. 눈꽃\n2. 체온계\n3. 침묵", ["눈꽃", "체온계", "침묵"]),
    ("제시어 [보리차, 주전자, 남기다]로 짧은 시를 창작해 주세요.", ["보리차", "주전자", "남기다"]),
    ("찻잔, 레코드판, 그리고 형용사 '쓸쓸하다'를 써서 산문시를 지어 줄래요?", ["찻잔", "레코드판", "쓸쓸하다"]),
    ("키보드, 보름달, 피로 세 단어 들어가게.", ["키보드", "보름달", "피로"]),  # 피로 is the word, not 피 + 로
    ("수평선, 연필, 후회가 다 들어가는 자유시", ["수평선", "연필", "후회"]),
    ("장화, 첫사랑, 고양이 넣어서 시", ["장화", "첫사랑", "고양이"]),  # not 고양 + 이
    # fewer than three named, or not Korean: no guess
    ("이별을 주제로 시를 쓰되 '강물'과 '단추'라는 단어를 꼭 넣어 주세요.", None),
    ("선착장에서의 설렘을 담은 글을 써 줘. 휘파람도 꼭 넣고.", None),
    ("Write a poem with sea, star, and dream.", None),
    ("짧은 시를 써 줘.", None),
    ("시를 써 줘", None),  # three bare words, but a request: no keywords in it
    ("바다 좀 써줘\n", None),
])
def test_keywords_from_prompt(prompt, expected):
    assert keywords_from_prompt(prompt) == expected


def test_keyword_parser_on_the_shipped_rows():
    rows = load_examples()
    found = [(r, keywords_from_prompt(r.instruction)) for r in rows]
    same = sum(k is not None and sorted(k) == sorted(r.keywords) for r, k in found)
    wrong = [(r.id, k) for r, k in found if k is not None and sorted(k) != sorted(r.keywords)]
    # measured when written: 163 of 175 (93.1 %) as sets, 159 in the row's own order; the 12 misses name
    # fewer than three keywords as a list (e.g. "이별을 주제로 … '강물'과 '단추'").
    assert same >= 0.9 * len(rows), same
    assert wrong == []  # a miss is reported by load_records; a wrong triple would not be


def test_keyword_parser_on_the_heldout_prompts():
    from kwjax.data import load_heldout

    rows = load_heldout()
    assert [keywords_from_prompt(r["prompt"]) for r in rows] == [r["keywords"] for r in rows]


def test_warning_once_per_file_when_keywords_are_missing(tmp_path, caplog):
    p = _jsonl(tmp_path / "nokw.jsonl", [
        {"input": "짧은 시를 써 줘.", "output": "a"},
        {"input": "바다, 별, 꿈으로 시", "output": "b"},
        {"input": "긴 시를 써 줘.", "output": "c", "id": "x"},
    ])
    with caplog.at_level(logging.WARNING, logger="kwjax.data"):
        recs = load_records(p, "sft")
    assert [r["keywords"] for r in recs] == [None, ["바다", "별", "꿈"], None]
    (warning,) = [r for r in caplog.records if r.name == "kwjax.data"]
    assert warning.levelno == logging.WARNING
    msg = warning.getMessage()
    assert str(p) in msg and "2 of 3 rows" in msg and "nokw.jsonl#1, x" in msg


def test_no_warning_when_every_row_has_keywords(tmp_path, caplog):
    p = _jsonl(tmp_path / "kw.jsonl", [{"input": "시", "output": "a", "keywords": ["시"]}])
    with caplog.at_level(logging.WARNING, logger="kwjax.data"):
        load_records(p, "sft")
    assert [r for r in caplog.records if r.name == "kwjax.data"] == []


# --------------------------------------------------------------------------------------------------
# Malformed rows: each error names the file, the line and the field


def _assert_names(exc_info, file_name, where, field):
    msg = str(exc_info.value)
    assert file_name in msg and where in msg and f"field '{field}'" in msg, msg
    assert exc_info.value.where == where and exc_info.value.field == field


GOOD = {"input": "시", "output": "좋은 시"}


@pytest.mark.parametrize("kind, row, field, problem", [
    ("sft", {"messages": "user: 시"}, "messages", "expected a list of messages"),
    ("sft", {"messages": []}, "messages", "non-empty list"),
    ("sft", {"messages": [{"content": "시"}, _bot("좋은 시")]}, "messages[0].role", "missing field"),
    ("sft", {"messages": [_user("시"), {"role": "assistant"}]}, "messages[1].content", "missing field"),
    ("sft", {"messages": [{"role": "human", "content": "시"}, _bot("좋은 시")]}, "messages[0].role",
     "expected one of ['system', 'user', 'assistant']"),
    ("sft", {"messages": [_user("시"), _bot(7)]}, "messages[1].content", "non-empty string"),
    ("sft", {"messages": [_user("시"), _bot("  ")]}, "messages[1].content", "non-empty string"),
    ("sft", {"messages": [SYS, _user("시")]}, "messages[1].role", "last message must be the assistant's"),
    ("sft", {"messages": [_user("시"), _bot("좋은 시"), _user("하나 더"), _bot("또")]}, "messages[2].role",
     "a second user turn"),
    ("sft", {"messages": [_user("시"), _bot("좋은 시"), _bot("또")]}, "messages[2].role", "single-turn"),
    ("sft", {"messages": [SYS, _bot("좋은 시")]}, "messages[1].role", "expected 'user'"),
    ("sft", {"messages": [_user("시"), SYS, _bot("좋은 시")]}, "messages[1].role", "expected 'assistant'"),
    ("sft", {"prompt": "시", "completion": ""}, "completion", "empty string"),
    ("sft", {"prompt": "시", "completion": [_bot("")]}, "completion[0].content", "non-empty string"),
    ("sft", {"prompt": "시", "completion": []}, "completion", "non-empty list"),
    ("sft", {"prompt": [_user("시")], "completion": [_user("좋은 시")]}, "completion[0].role", "expected 'assistant'"),
    ("sft", {"prompt": [_user("시"), _bot("x")], "completion": [_bot("y")]}, "prompt[1].role", "user's message"),
    ("sft", {"prompt": "시", "completion": [_bot("a"), _bot("b")]}, "completion", "one assistant message"),
    ("sft", {"instruction": "시", "input": 3, "output": "좋은 시"}, "input", "expected a string"),
    ("sft", {"instruction": "시", "input": "바다"}, "output", "missing field"),
    ("sft", {"instruction": "", "output": "좋은 시"}, "instruction", "empty string"),
    ("sft", {"text": "<start_of_turn>user 시"}, "text", "no prompt and response"),
    ("dpo", {"chosen": [_user("시"), _bot("좋은 시")], "rejected": [_user("다른 시"), _bot("나쁜 시")]}, "rejected[0]",
     "differs from chosen[0]"),
    ("dpo", {"chosen": [SYS, _user("시"), _bot("좋은 시")], "rejected": [_user("시"), _bot("나쁜 시")]}, "rejected[0]",
     "differs from chosen[0]"),
    ("dpo", {"chosen": [_bot("좋은 시")], "rejected": [_bot("나쁜 시")]}, "prompt", "share no prompt messages"),
    ("dpo", {"chosen": [_user("시"), _bot("좋은 시")], "rejected": [_user("시")]}, "rejected[0].role",
     "last message must be the assistant's"),
    ("dpo", {"chosen": [_user("시"), _bot("좋은 시")]}, "rejected", "missing field"),
    ("dpo", {"chosen": [_user("시"), _bot("좋은 시")], "rejected": "나쁜 시"}, "rejected", "expected a list of messages"),
    ("dpo", {"chosen": "좋은 시", "rejected": "나쁜 시"}, "prompt", "missing field"),
    ("dpo", {"prompt": [_user("시")], "chosen": [_bot("좋은 시")], "rejected": [_bot("")]}, "rejected[0].content",
     "non-empty string"),
    ("dpo", {"instruction": "시", "chosen": "좋은 시"}, "rejected", "missing field"),
])
def test_malformed_row_names_file_line_field(tmp_path, kind, row, field, problem):
    good = GOOD if kind == "sft" else {"prompt": "p", "chosen": "c", "rejected": "r"}
    p = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_records(p, kind)
    _assert_names(e, "bad.jsonl", "line 2", field)
    assert problem in str(e.value), str(e.value)


def test_datasets_table_mixing_formats(tmp_path):
    # A datasets table has every column in every row: the columns a row's format lacks read as None.
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list([
        {"messages": [_user("a"), _bot("b")], "instruction": None, "input": None, "output": None},
        {"messages": None, "instruction": "c", "input": None, "output": "d"},
        {"messages": None, "instruction": None, "input": "e", "output": "f"},
    ]).save_to_disk(str(d))
    assert load_records(d, "sft") == [
        {"id": "ds#1", "input": "a", "output": "b", "keywords": None},
        {"id": "ds#2", "input": "c", "output": "d", "keywords": None},
        {"id": "ds#3", "input": "e", "output": "f", "keywords": None},
    ]
