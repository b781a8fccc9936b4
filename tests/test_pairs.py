"""On-policy pair builder: scores against hand-computed cases, pair choice on hand-written candidates,
resumed sampling = uninterrupted sampling, and the held-out-keyword prompts."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from kwjax import data, pairs
from kwjax.stages import load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "'항구', '우체통', '그리움'이 들어간 시를 한 편 써 주세요."
KEYWORDS = ["항구", "우체통", "그리움"]


def test_score_hand_cases():
    good = "녹슨 우체통 하나가 항구 끝에 서 있다\n그리움이란 받는 사람 없이도 닳아 가는 일"
    s = pairs.score(good, "stop_token", PROMPT, KEYWORDS)
    assert s == {"keywords_present": 3, "all_keywords": True, "echo": False, "terminated": True,
                 "seq_rep_4": 0.0, "chars": len(good)}
    # The prompt copied back names every keyword, but inside the echo they do not count.
    echo = PROMPT + " 바다가 보인다"
    s = pairs.score(echo, "max_new_tokens", PROMPT, KEYWORDS)
    assert s["echo"] and s["keywords_present"] == 0 and not s["terminated"]
    # 12 words, 9 word 4-grams of which 4 are distinct: 1 - 4/9.
    loop = "항구 우체통 그리움 바다 " * 3
    assert pairs.score(loop, "stop_token", PROMPT, KEYWORDS)["seq_rep_4"] == pytest.approx(5 / 9)


def _scores(**kw):
    base = {"keywords_present": 3, "all_keywords": True, "echo": False, "terminated": True, "seq_rep_4": 0.0,
            "chars": 150}
    return {**base, **kw}


def test_failures_each_rule_and_threshold():
    rules = pairs.PairRules(max_seq_rep_4=0.25, min_chars=60)
    assert pairs.failures(_scores(), rules) == []
    assert pairs.failures(_scores(all_keywords=False, keywords_present=2), rules) == ["missing_keyword"]
    assert pairs.failures(_scores(echo=True), rules) == ["echo"]
    assert pairs.failures(_scores(terminated=False), rules) == ["no_stop"]
    assert pairs.failures(_scores(seq_rep_4=0.25), rules) == []  # at the threshold: passes
    assert pairs.failures(_scores(seq_rep_4=0.26), rules) == ["repetition"]
    assert pairs.failures(_scores(chars=59), rules) == ["too_short"]
    assert pairs.failures(_scores(chars=59, echo=True, terminated=False), rules) == ["echo", "no_stop", "too_short"]


def _cand(rid, mode, index, text, split="train", **scores):
    return {"id": rid, "split": split, "prompt": f"prompt {rid}", "keywords": KEYWORDS, "keyword_kinds": None,
            "mode": mode, "sample_index": index, "text": text, "stop_reason": "stop_token",
            "scores": _scores(chars=len(text), **scores)}


def test_build_pairs_on_hand_written_candidates():
    plan = pairs.SamplingPlan(model="m", samples=2)
    cands = [
        # a: one pass, two fails; the rejected one is the fail nearest the chosen in length (70 vs 80 chars).
        _cand("a", "greedy", 0, "x" * 100),
        _cand("a", "sample", 0, "y" * 70, all_keywords=False, keywords_present=2),
        _cand("a", "sample", 1, "z" * 300, terminated=False),
        # b: nothing passes: the authored passage is chosen, the fail nearest its 120 characters rejected.
        _cand("b", "greedy", 0, "p" * 400, terminated=False),
        _cand("b", "sample", 0, "q" * 110, echo=True),
        # c: everything passes: no pair.
        _cand("c", "greedy", 0, "r" * 100),
        # d: held out, nothing passes and no authored passage: no pair.
        _cand("d", "greedy", 0, "s" * 100, split="heldout", echo=True),
    ]
    built, summary = pairs.build_pairs(cands, {"a": "A" * 80, "b": "B" * 120}, plan)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in built] == [("a", "x" * 100, "y" * 70),
                                                                        ("b", "B" * 120, "q" * 110)]
    pa, pb = (p["provenance"] for p in built)
    assert pa["chosen_from"] == "greedy:0" and pa["rejected_from"] == "sample:0"
    assert pa["rejected_failures"] == ["missing_keyword"] and pa["passing"] == 1 and pa["candidates"] == 3
    assert pb["chosen_from"] == "authored" and pb["rejected_failures"] == ["echo"]
    assert pb["chosen_scores"]["chars"] == 120 and pa["sampling"]["model"] == "m"
    assert summary["skipped"] == {"all_candidates_pass": 1, "nothing_passes_and_no_authored": 1}
    assert summary["chosen_from"] == {"authored": 1, "sample": 1}


def test_pairs_file_reads_as_dpo_records(tmp_path):
    plan = pairs.SamplingPlan(model="m")
    built, _ = pairs.build_pairs([_cand("a", "greedy", 0, "x" * 100),
                                  _cand("a", "sample", 0, "y" * 90, echo=True)], {}, plan)
    pairs.write_pairs(tmp_path / "p.jsonl", built)
    recs = data.load_records(tmp_path / "p.jsonl", "dpo")
    assert recs == [{"id": "a", "prompt": "prompt a", "chosen": "x" * 100, "rejected": "y" * 90,
                     "keywords": KEYWORDS}]


@pytest.fixture(scope="module")
def tiny():
    cfg = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    return load_model(cfg)


ROWS = [{"id": f"r{i}", "prompt": f"'항구', '우체통', '그리움'으로 시 {i}", "keywords": KEYWORDS, "split": "train"}
        for i in range(3)]


def _texts(rows):
    return [(r["id"], r["mode"], r["sample_index"], r["text"]) for r in rows]


def test_resumed_sampling_draws_what_an_uninterrupted_one_does(tiny, tmp_path):
    plan = pairs.SamplingPlan(model="tiny", samples=2, max_new_tokens=6, batch_size=2)
    whole = pairs.sample_candidates(tiny, ROWS, plan, tmp_path / "a.jsonl", chunk=2, progress=False)
    assert len(whole) == 9 and {r["mode"] for r in whole} == {"greedy", "sample"}
    # The two samples of one prompt differ from each other (their seeds do), and so do two prompts' streams.
    first = pairs.sample_candidates(tiny, ROWS[:2], plan, tmp_path / "b.jsonl", chunk=2, progress=False)
    assert len(first) == 6
    resumed = pairs.sample_candidates(tiny, ROWS, plan, tmp_path / "b.jsonl", chunk=2, progress=False)
    assert sorted(_texts(resumed)) == sorted(_texts(whole))
    samples = {(r["id"], r["sample_index"]): r["text"] for r in whole if r["mode"] == "sample"}
    assert samples[("r0", 0)] != samples[("r0", 1)] or samples[("r1", 0)] != samples[("r1", 1)]


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    plan = pairs.SamplingPlan(model="tiny", samples=1, max_new_tokens=4, batch_size=2)
    pairs.sample_candidates(tiny, ROWS[:1], plan, tmp_path / "c.jsonl", progress=False)
    before = (tmp_path / "c.jsonl").read_text(encoding="utf-8")
    other = pairs.SamplingPlan(model="tiny", samples=1, max_new_tokens=4, batch_size=2, temperature=0.7)
    with pytest.raises(pairs.PairsError, match="temperature"):
        pairs.sample_candidates(tiny, ROWS, other, tmp_path / "c.jsonl", progress=False)
    assert (tmp_path / "c.jsonl").read_text(encoding="utf-8") == before


def test_bad_candidates_line_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(pairs.PairsError, match=r"c.jsonl:1: candidate row lacks"):
        pairs.read_candidates(path)
    path.write_text("\n{oops\n", encoding="utf-8")
    with pytest.raises(pairs.PairsError, match=r"c.jsonl:2: not valid JSON"):
        pairs.read_candidates(path)


def test_heldout_prompts_use_keywords_the_shipped_set_never_has():
    rows = data.load_heldout()
    assert len(rows) >= 35 and len({r["id"] for r in rows}) == len(rows)
    shipped = {k for e in data.load_examples() for k in e.keywords}
    for r in rows:
        for k in r["keywords"]:
            assert k in r["prompt"], (r["id"], k)  # the prompt names it
            assert not [s for s in shipped if s in k or k in s], (r["id"], k)


def test_bad_heldout_row_names_line_and_field(tmp_path):
    good = {"id": "h1", "instruction": "a, b, c로 시", "form": "poem", "keywords": ["a", "b", "c"],
            "keyword_kinds": ["concrete", "concrete", "abstract"]}
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "keyword_kinds": ["thing"] * 3}) + "\n",
                    encoding="utf-8")
    with pytest.raises(data.DataError, match=r"h.jsonl, line 2, field 'keyword_kinds'"):
        data.load_heldout(path)


def test_script_names_a_prompts_file_without_keywords(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"input": "바다에 관한 긴 시를 한 편 써 주세요", "output": "바다"}) + "\n",
                    encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_pairs.py"), "--model=gemma3-270m",
                        f"--out_dir={tmp_path / 'out'}", f"--prompts_file={path}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "p.jsonl" in r.stderr and "keywords" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def _pair(rid, split=None):
    row = {"id": rid, "prompt": f"'a', 'b', 'c'로 시 {rid}", "chosen": "좋은 시", "rejected": "나쁜 시",
           "keywords": ["a", "b", "c"]}
    return {**row, "split": split} if split else row


def test_preference_file_splits(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [_pair("t1", "train"), _pair("v1", "validation"), _pair("h1", "heldout"), _pair("n1")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = runpy.run_path(str(ROOT / "configs" / "experiment.py"))["get_config"]()
    cfg.data.preference_file = str(path)
    train, evals = data.split_rows(cfg, "dpo")
    strip = lambda r: {k: v for k, v in r.items() if k != "split"}  # noqa: E731
    assert train == [strip(rows[0]), strip(rows[3])] and evals == [strip(rows[1])]  # held out: never trained
    sft_train, _ = data.split_rows(cfg, "sft")  # SFT keeps the authored passages
    assert [r["id"] for r in sft_train] == [e.id for e in data.load_examples(split="train")]
    path.write_text(json.dumps({**_pair("x"), "split": 3}) + "\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"p.jsonl, line 1, field 'split'"):
        data.split_rows(cfg, "dpo")
    path.write_text(json.dumps(_pair("x", "validation")) + "\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="no training rows"):
        data.split_rows(cfg, "dpo")


def test_fingerprints_follow_what_each_task_reads():
    from kwjax import experiment

    cfg = runpy.run_path(str(ROOT / "configs" / "experiment.py"))["get_config"]()
    other = runpy.run_path(str(ROOT / "configs" / "experiment.py"))["get_config"]()
    other.data.preference_file = "pairs.jsonl"
    assert experiment.train_fingerprint(cfg, "sft") == experiment.train_fingerprint(other, "sft")
    for method in ("dpo", "sft_dpo"):
        assert experiment.train_fingerprint(cfg, method) != experiment.train_fingerprint(other, method)
    assert experiment.eval_fingerprint(cfg, "sft") == experiment.eval_fingerprint(other, "sft")
    other.data.eval_file = "heldout.jsonl"  # other prompts: the base model's evaluation is another one
    assert experiment.eval_fingerprint(cfg, "base") != experiment.eval_fingerprint(other, "base")


def test_pair_accuracy_script_names_a_missing_split(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_pair("t1", "train"), ensure_ascii=False) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "pair_accuracy.py"), "--model=gemma3-270m",
                        f"--pairs={path}", "--split=heldout"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "p.jsonl" in r.stderr and "no rows with split 'heldout'" in r.stderr, r.stderr


def test_shipped_on_policy_set_has_no_single_feature_shortcut():
    from kwjax import shortcuts

    path = ROOT / "kwjax" / "data_files" / "keyword_literature_onpolicy.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    a = shortcuts.audit(shortcuts.pairs_of(rows))
    # The authored set: one feature orders 174/175 pairs (data/CARD.md); the bar here is 70 %.
    assert a.best.pairwise <= 0.70 and max(r.threshold for r in a.results) <= 0.70, a.best
    for r in rows:
        prov = r["provenance"]
        assert prov["rejected_failures"] and set(prov["rejected_failures"]) <= set(pairs.FAILURES)
        assert pairs.failures(prov["rejected_scores"], pairs.PairRules(**prov["rules"])) == prov["rejected_failures"]
        if prov["chosen_from"] == "authored":
            assert r["split"] in ("train", "validation")  # the held-out prompts have no authored passage
        else:
            assert pairs.failures(prov["chosen_scores"], pairs.PairRules(**prov["rules"])) == []
    prompts = {r["prompt"] for r in rows if r["split"] == "train"}
    assert not prompts & {r["prompt"] for r in rows if r["split"] != "train"}
