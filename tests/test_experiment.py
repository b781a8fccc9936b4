"""The experiment: claims judged by fixed rules, pooled summaries, and a tiny end-to-end run with reuse."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from kwjax import evaluate as evallib
from kwjax import metrics, report

ROOT = Path(__file__).resolve().parents[1]


def m(mean, low, high):
    return {"mean": mean, "low": low, "high": high}


def summary(over=None):
    """A summary where every claim holds; `over` replaces (model, block, key) entries."""
    s = {
        "base": {"greedy": {"all_keywords/morpheme": m(0.2, 0.1, 0.35), "prompt_echo": m(0.8, 0.6, 0.9),
                            "seq_rep_4": m(0.10, 0.05, 0.15), "terminated": m(0.5, 0.3, 0.7)},
                 "likelihood": {"preference_accuracy": m(0.50, 0.35, 0.65)}},
        "sft": {"greedy": {"all_keywords/morpheme": m(0.5, 0.35, 0.65), "seq_rep_4": m(0.40, 0.30, 0.50),
                           "terminated": m(0.2, 0.1, 0.4)},
                "likelihood": {"preference_accuracy": m(0.60, 0.45, 0.75)}},
        "dpo": {"greedy": {"all_keywords/morpheme": m(0.4, 0.25, 0.55), "seq_rep_4": m(0.12, 0.06, 0.18),
                           "terminated": m(0.55, 0.35, 0.75)},
                "likelihood": {"preference_accuracy": m(0.80, 0.70, 0.90)}},
        "sft_dpo": {"greedy": {"all_keywords/morpheme": m(0.97, 0.93, 1.0), "seq_rep_4": m(0.12, 0.06, 0.18),
                               "terminated": m(0.6, 0.4, 0.8)},
                    "likelihood": {"preference_accuracy": m(0.95, 0.85, 1.0)}},
    }
    for (model, block, key), value in (over or {}).items():
        s[model][block][key] = value
    return s


def verdicts(s):
    return [c.verdict for c in report.judge_claims(s)]


def test_claims_all_supported():
    assert verdicts(summary()) == ["supported"] * 4


@pytest.mark.parametrize("over, index, expected", [
    # 1: the base's all-three rate: upper bound at 0.9 is not below it; a mean at 0.9 is the wrong side.
    ({("base", "greedy", "all_keywords/morpheme"): m(0.85, 0.7, 0.95)}, 0, "inconclusive"),
    ({("base", "greedy", "all_keywords/morpheme"): m(0.9, 0.8, 1.0)}, 0, "not supported"),
    # 2: SFT repetition must clear the base's interval.
    ({("sft", "greedy", "seq_rep_4"): m(0.14, 0.08, 0.2)}, 1, "inconclusive"),
    ({("sft", "greedy", "seq_rep_4"): m(0.10, 0.05, 0.2)}, 1, "not supported"),
    # 3: structure broken (repeats, or stops ending) -> not supported; preference not separated -> inconclusive.
    ({("dpo", "greedy", "seq_rep_4"): m(0.3, 0.2, 0.4)}, 2, "not supported"),
    ({("dpo", "greedy", "terminated"): m(0.1, 0.0, 0.2)}, 2, "not supported"),
    ({("dpo", "likelihood", "preference_accuracy"): m(0.6, 0.45, 0.75)}, 2, "inconclusive"),
    ({("dpo", "likelihood", "preference_accuracy"): m(0.5, 0.35, 0.65)}, 2, "not supported"),
    # 4: best on both metrics, clear of the runner-up's mean, without repeating.
    ({("sft_dpo", "greedy", "all_keywords/morpheme"): m(0.55, 0.4, 0.7)}, 3, "inconclusive"),
    ({("sft_dpo", "greedy", "all_keywords/morpheme"): m(0.5, 0.4, 0.6)}, 3, "not supported"),
    ({("sft_dpo", "likelihood", "preference_accuracy"): m(0.79, 0.6, 0.9)}, 3, "not supported"),
    ({("sft_dpo", "greedy", "seq_rep_4"): m(0.3, 0.2, 0.4)}, 3, "not supported"),
])
def test_claim_rules(over, index, expected):
    got = verdicts(summary(over))
    assert got[index] == expected, report.judge_claims(summary(over))[index]
    assert all(v == "supported" for i, v in enumerate(got) if i != index)


def test_missing_model_is_not_evaluated():
    s = summary()
    del s["sft"]
    assert verdicts(s) == ["supported", "not evaluated", "supported", "not evaluated"]


def _combine(tmp_path, *contents, name="combined"):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import combine_reports
    finally:
        sys.path.pop(0)

    paths = []
    for i, content in enumerate(contents):
        paths.append(tmp_path / f"summary_{i}.json")
        paths[-1].write_text(json.dumps(content), encoding="utf-8")
    out = tmp_path / f"{name}.md"
    rc = combine_reports.main([*map(str, paths), f"--out={out}"])
    return rc, out, paths


def test_claims_judged_across_merged_runs(tmp_path):
    """A run with base and SFT, another with its own base, DPO and SFT->DPO: merged, every claim is judged,
    and the base model is the first file's."""
    full = summary()
    failing_base = json.loads(json.dumps(full["base"]))
    failing_base["greedy"]["all_keywords/morpheme"] = m(0.95, 0.9, 1.0)  # claim 1 fails on this base
    first = {"summary": {"base": full["base"], "sft": full["sft"]}}
    second = {"summary": {"base": failing_base, "dpo": full["dpo"], "sft_dpo": full["sft_dpo"]}}
    assert verdicts(first["summary"]) == ["supported", "supported", "not evaluated", "not evaluated"]

    rc, out, paths = _combine(tmp_path, first, second)
    assert rc == 0
    got = json.loads(out.with_suffix(".json").read_text("utf-8"))
    assert [c["verdict"] for c in got["claims"]] == ["supported"] * 4
    assert got["sources"] == {"base": str(paths[0]), "sft": str(paths[0]), "dpo": str(paths[1]),
                              "sft_dpo": str(paths[1])}
    text = out.read_text("utf-8")
    assert text.count("| **supported** |") == 4 and "| metric | base | SFT | DPO | SFT→DPO |" in text

    rc, out, _ = _combine(tmp_path, second, first, name="reversed")
    assert rc == 0
    assert json.loads(out.with_suffix(".json").read_text("utf-8"))["claims"][0]["verdict"] == "not supported"


def test_combine_refuses_a_file_that_is_not_a_summary(tmp_path, capsys):
    rc, out, paths = _combine(tmp_path, {"summary": summary()}, [1, 2])
    assert rc == 2 and not out.exists()
    assert str(paths[1]) in capsys.readouterr().err


def gen(id_, text, run="0", mode="greedy", stop="stop_token", keywords=("바다", "편지", "기다림")):
    return evallib.Generation(id_, f"{', '.join(keywords)}로 글을 써 줘", list(keywords), mode, 0, text, [], stop, run)


def test_summarize_pools_runs_by_prompt():
    texts = {("a", "0"): "바다를 보며 편지를 썼다 기다림은 길었다", ("b", "0"): "비가 온다 비가 온다 비가 온다 비가 온다",
             ("a", "1"): "바다 바다 바다 바다 바다", ("b", "1"): "편지를 기다리는 바다의 밤이 깊었다"}
    gens = [gen(i, t, run=r) for (i, r), t in texts.items()]
    lik = [evallib.PairLikelihood("a", -10.0, 5, -30.0, 10, "0"), evallib.PairLikelihood("b", -40.0, 10, -8.0, 4, "0"),
           evallib.PairLikelihood("a", -12.0, 5, -35.0, 10, "1"), evallib.PairLikelihood("b", -30.0, 10, -10.0, 4, "1")]
    s = evallib.summarize(gens, lik)
    g = s["greedy"]
    # Means are plain means over the four outputs.
    reps = [metrics.seq_rep_n(t, 4) for t in texts.values()]
    assert g["seq_rep_4"]["mean"] == pytest.approx(np.mean(reps))
    # Greedy Self-BLEU compares an output only with the other prompts' outputs of its own run.
    expected = [sacrebleu.sentence_bleu(texts[(i, r)], [texts[(j, r)] for j in "ab" if j != i],
                                        tokenize=metrics.SELF_BLEU_TOKENIZE).score for (i, r) in texts]
    assert g["self_bleu"]["mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    # distinct-n: within each run, then averaged.
    want = np.mean([metrics.distinct_n([texts[(i, r)] for i in "ab"], 2) for r in "01"])
    assert g["distinct_2"] == pytest.approx(want)
    # NLL: token-weighted over all pairs; preference accuracy per pair (per-token log-probs compared).
    nll = (10 + 40 + 12 + 30) / (5 + 10 + 5 + 10)
    assert s["likelihood"]["nll_chosen"]["mean"] == pytest.approx(nll)
    assert s["likelihood"]["perplexity_chosen"]["mean"] == pytest.approx(math.exp(nll))
    wins = [-10 / 5 > -30 / 10, -40 / 10 > -8 / 4, -12 / 5 > -35 / 10, -30 / 10 > -10 / 4]
    assert s["likelihood"]["preference_accuracy"]["mean"] == pytest.approx(np.mean(wins))
    assert s["likelihood"]["pairs"] == 2
    for block in (g, s["likelihood"]):
        for v in block.values():
            if isinstance(v, dict):
                assert v["low"] <= v["mean"] + 1e-12 and v["mean"] <= v["high"] + 1e-12


def test_ratio_bootstrap_groups_resample_units():
    num, den = np.array([1.0, 3.0, 2.0, 8.0]), np.array([1.0, 1.0, 2.0, 2.0])
    mean, low, high = metrics.ratio_bootstrap_ci(num, den, ["x", "x", "y", "y"], seed=1)
    assert mean == pytest.approx(14 / 6)
    # Two groups with ratios 4/2 and 10/4: every resample is one of 2, 2.5 or 14/6.
    assert 2.0 <= low <= high <= 2.5
    with pytest.raises(ValueError, match="denominators must be positive"):
        metrics.ratio_bootstrap_ci([1.0], [0.0])


def test_preset_flag_becomes_config():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import experiment as script
    finally:
        sys.path.pop(0)
    out = script.preset_to_config(["prog", "--preset=quick", "--config.eval.limit=3"])
    assert out == ["prog", f"--config={ROOT / 'configs' / 'quick.py'}", "--config.eval.limit=3"]
    assert script.preset_to_config(["prog", "--workdir=w"]) == ["prog", f"--config={ROOT / 'configs' / 'quick.py'}",
                                                                "--workdir=w"]
    assert script.preset_to_config(["prog", "--config=c.py"]) == ["prog", "--config=c.py"]
    with pytest.raises(SystemExit, match="one of"):
        script.preset_to_config(["prog", "--preset", "huge"])
    with pytest.raises(SystemExit, match="not both"):
        script.preset_to_config(["prog", "--preset=tiny", "--config=configs/quick.py"])


def run_cli(workdir, *extra):
    cmd = [sys.executable, str(ROOT / "scripts" / "experiment.py"), "--preset=tiny", f"--workdir={workdir}", *extra]
    # The disk cache of compiled programs on, in the test's own directory (later tasks load programs).
    env = {**os.environ, "KWJAX_XLA_CACHE": str(Path(workdir).parent / "xla")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)


def test_tiny_experiment_end_to_end(tmp_path):
    workdir = tmp_path / "exp"
    done = run_cli(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    rep = workdir / "report"
    text = (rep / "report.md").read_text(encoding="utf-8")
    for claim in ("The base model misses keywords.", "SFT collapses into degenerate repetition.",
                  "DPO keeps the output's structure", "SFT followed by DPO is the best recipe."):
        line = next(l for l in text.splitlines() if claim in l)
        assert any(f"**{v}**" in line for v in ("supported", "not supported", "inconclusive")), line
    for png in ("training_curves.png", "metrics.png"):
        data = (rep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    record = json.loads((workdir / "experiment.json").read_text())
    # The report's way to reproduce it is the command that ran it, flags and all.
    assert record["command"] == f"python scripts/experiment.py --preset=tiny --workdir={workdir}"
    assert f"- Reproduce: `{record['command']}`" in text
    kinds = [(t["kind"], t["model"]) for t in record["tasks"]]
    assert kinds == [("eval", "base"), ("train", "sft"), ("eval", "sft"), ("train", "dpo"), ("eval", "dpo"),
                     ("train", "sft_dpo"), ("eval", "sft_dpo")]
    assert not any(t["reused"] for t in record["tasks"])
    # Each task's peak holds at least the JAX runtime and the tiny model (a process is > 100 MiB).
    assert all(t["peak_rss_mib"] > 100 for t in record["tasks"]), record["tasks"]
    # Each task counts the XLA programs it compiled; the first has nothing cached to reuse.
    assert all(t["timings"]["xla_compiles"] >= 0 for t in record["tasks"])
    assert record["tasks"][0]["timings"]["xla_compiles"] >= 1 and record["tasks"][0]["timings"]["xla_compile_s"] > 0
    # SFT->DPO's step is DPO's program on the SFT weights: loaded from the disk cache, not compiled.
    assert record["tasks"][5]["timings"]["xla_cache_hits"] >= 1, record["tasks"][5]["timings"]
    top = max(record["tasks"], key=lambda t: t["peak_rss_mib"])
    assert f"- Peak resident memory: {top['peak_rss_mib'] / 1024:.1f} GiB ({top['kind']}" in text

    # The table's numbers are the evaluations' own: base's greedy seq-rep-4 from its samples.jsonl.
    base = [json.loads(l) for l in (workdir / "seed_0/eval/base/samples.jsonl").read_text("utf-8").splitlines()]
    want = np.mean([metrics.seq_rep_n(g["text"], 4) for g in base if g["mode"] == "greedy"])
    summary_json = json.loads((rep / "summary.json").read_text(encoding="utf-8"))
    assert summary_json["summary"]["base"]["greedy"]["seq_rep_4"]["mean"] == pytest.approx(want)

    # SFT→DPO starts from the SFT model and uses it as its reference: loss ln 2 at its first step, but
    # log-probs unlike plain DPO's first step (which starts from the base).
    def first(method):
        return json.loads((workdir / f"seed_0/train/{method}/metrics.jsonl").read_text().splitlines()[0])

    assert first("sft_dpo")["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(first("sft_dpo")["logps/chosen"] - first("dpo")["logps/chosen"]) > 1e-3

    # A rerun reuses every piece and rewrites the same claims.
    again = run_cli(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    record_again = json.loads((workdir / "experiment.json").read_text())
    assert all(t["reused"] for t in record_again["tasks"])
    assert [t["peak_rss_mib"] for t in record_again["tasks"]] == [t["peak_rss_mib"] for t in record["tasks"]]
    assert [l for l in (rep / "report.md").read_text("utf-8").splitlines() if l.startswith("| The")] == \
        [l for l in text.splitlines() if l.startswith("| The")]

    # Other settings in the same workdir: a clear error naming the directory, nothing overwritten.
    changed = run_cli(workdir, "--config.dpo.beta=0.3")
    assert changed.returncode == 2
    assert "holds results made with other settings" in changed.stderr and "train/dpo" in changed.stderr


def test_recorded_command_words_split_back_to_the_arguments():
    """The report's command, pasted into a shell, passes the same arguments (tuple overrides included)."""
    import shlex

    from kwjax.cli import command_line, shell_word

    args = ["--preset=quick", "--config.experiment.methods=('sft','sft_dpo')", "--workdir=/tmp/a b",
            'a"b$c', "it's"]
    words = [shell_word(a) for a in args]
    assert shlex.split(" ".join(words)) == args
    assert words[1] == "\"--config.experiment.methods=('sft','sft_dpo')\""
    assert shlex.split(command_line("scripts/experiment.py", args)) == ["python", "scripts/experiment.py", *args]