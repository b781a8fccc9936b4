"""The experiment's report: comparison table, the write-up's claims judged by the numbers, plots, samples.

Claims are judged on greedy outputs with prompt-grouped bootstrap 95% intervals, by rules fixed here
(and printed in the report) before anyone looks at the numbers: "supported" needs the interval to clear
the comparison, "not supported" means the direction is wrong, and "inconclusive" means the direction is
right but the intervals overlap.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

from kwjax import evaluate as evallib
from kwjax.files import atomic_write_text
from kwjax.runs import read_marker

LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO", "sft_dpo": "SFT→DPO", "chosen": "chosen (data)"}
# (key, label, decimals); the arrow says which direction is better.
GEN_ROWS = [
    ("all_keywords/morpheme", "all three keywords, morpheme ↑", 2),
    ("all_keywords/surface", "all three keywords, surface ↑", 2),
    ("keyword_coverage/morpheme", "keyword coverage, morpheme ↑", 2),
    ("prompt_echo", "prompt echo ↓", 2),
    ("seq_rep_4", "seq-rep-4 ↓", 3),
    ("seq_rep_2", "seq-rep-2 ↓", 3),
    ("distinct_2", "distinct-2 ↑", 3),
    ("self_bleu", "Self-BLEU ↓", 1),
    ("length_words", "length, words", 0),
    ("terminated", "ended with end-of-turn ↑", 2),
]
LIK_ROWS = [
    ("nll_chosen", "NLL of chosen, nats/token ↓", 3),
    ("perplexity_chosen", "perplexity of chosen ↓", 1),
    ("preference_accuracy", "preference accuracy ↑", 2),
]
BASELINE_ALL_KEYWORDS = 0.9  # CommonGen's human all-keywords rate is about 0.99


@dataclasses.dataclass
class Claim:
    claim: str
    rule: str
    verdict: str  # supported, not supported, inconclusive, not evaluated
    evidence: str


# ---- collecting ----------------------------------------------------------------------------------------


def collect(tasks, rows: Sequence[dict]) -> tuple[dict, dict]:
    """Per model: its generations and pair likelihoods pooled over seeds; plus the chosen responses."""
    gens: dict[str, list] = {}
    liks: dict[str, list] = {}
    for t in tasks:
        if t.kind != "eval":
            continue
        gens.setdefault(t.model, []).extend(evallib.read_jsonl(t.path / "samples.jsonl", evallib.Generation))
        lik_path = t.path / "likelihoods.jsonl"
        if lik_path.is_file():
            liks.setdefault(t.model, []).extend(evallib.read_jsonl(lik_path, evallib.PairLikelihood))
    gens["chosen"] = [evallib.Generation(str(r.get("id", "")), r["prompt"], list(r.get("keywords") or []),
                                         "greedy", 0, r["chosen"], [], "stop_token", "data") for r in rows]
    return gens, liks


def summarize(gens: dict, liks: dict) -> dict:
    return {m: evallib.summarize(gens[m], liks.get(m, ())) for m in gens}


# ---- claims --------------------------------------------------------------------------------------------


def _get(summary: dict, model: str, block: str, key: str):
    try:
        m = summary[model][block][key]
    except KeyError:
        return None
    return None if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in m.values()) else m


def _fmt(m: dict | None, d: int = 2) -> str:
    if m is None:
        return "—"
    return f"{m['mean']:.{d}f} [{m['low']:.{d}f}, {m['high']:.{d}f}]"


def _higher(a: dict, b: dict) -> str:
    """'yes' if a's interval lies above b's, 'no' if a's mean is not above b's, else 'overlap'."""
    if a["low"] > b["high"]:
        return "yes"
    return "no" if a["mean"] <= b["mean"] else "overlap"


def judge_claims(summary: dict) -> list[Claim]:
    g = lambda model, key: _get(summary, model, "greedy", key)  # noqa: E731
    lk = lambda model, key: _get(summary, model, "likelihood", key)  # noqa: E731
    claims = []

    # 1. The base model misses keywords.
    rule = (f"the base model's all-three-keywords rate (morpheme level, prompt echo excluded) has its upper "
            f"bound below {BASELINE_ALL_KEYWORDS}")
    base_kw = g("base", "all_keywords/morpheme")
    if base_kw is None:
        claims.append(Claim("The base model misses keywords.", rule, "not evaluated", "no base evaluation"))
    else:
        verdict = ("supported" if base_kw["high"] < BASELINE_ALL_KEYWORDS else
                   "not supported" if base_kw["mean"] >= BASELINE_ALL_KEYWORDS else "inconclusive")
        echo = g("base", "prompt_echo")
        claims.append(Claim("The base model misses keywords.", rule, verdict,
                            f"base all three: {_fmt(base_kw)}; prompt echo {_fmt(echo)}"))

    # 2. SFT collapses into degenerate repetition.
    rule = "SFT's seq-rep-4 interval lies above the base model's"
    sft_rep, base_rep = g("sft", "seq_rep_4"), g("base", "seq_rep_4")
    if sft_rep is None or base_rep is None:
        claims.append(Claim("SFT collapses into degenerate repetition.", rule, "not evaluated", "SFT or base missing"))
    else:
        v = {"yes": "supported", "no": "not supported", "overlap": "inconclusive"}[_higher(sft_rep, base_rep)]
        claims.append(Claim("SFT collapses into degenerate repetition.", rule, v,
                            f"seq-rep-4: SFT {_fmt(sft_rep, 3)}, base {_fmt(base_rep, 3)}"))

    # 3. DPO keeps the structure and moves toward the literary (chosen) style.
    rule = ("structure kept: DPO's seq-rep-4 is not above the base model's (intervals) and its end-of-turn "
            "rate not below it; style moved: DPO's preference accuracy interval lies above the base model's")
    need = [g("dpo", "seq_rep_4"), base_rep, g("dpo", "terminated"), g("base", "terminated"),
            lk("dpo", "preference_accuracy"), lk("base", "preference_accuracy")]
    if any(x is None for x in need):
        claims.append(Claim("DPO keeps the output's structure and moves toward a literary tone.", rule,
                            "not evaluated", "DPO or base missing"))
    else:
        dpo_rep, _, dpo_term, base_term, dpo_acc, base_acc = need
        kept = _higher(dpo_rep, base_rep) != "yes" and _higher(base_term, dpo_term) != "yes"
        moved = _higher(dpo_acc, base_acc)
        verdict = ("not supported" if not kept or moved == "no" else
                   "supported" if moved == "yes" else "inconclusive")
        claims.append(Claim(
            "DPO keeps the output's structure and moves toward a literary tone.", rule, verdict,
            f"seq-rep-4: DPO {_fmt(dpo_rep, 3)}, base {_fmt(base_rep, 3)}; ended: DPO {_fmt(dpo_term)}, base "
            f"{_fmt(base_term)}; preference accuracy: DPO {_fmt(dpo_acc)}, base {_fmt(base_acc)}"))

    # 4. SFT followed by DPO is the best recipe.
    rule = ("SFT→DPO has the highest all-three-keywords rate (morpheme) and the highest preference accuracy "
            "of the four models, each interval above the runner-up's mean, and its seq-rep-4 is not above "
            "the base model's")
    models = ["base", "sft", "dpo", "sft_dpo"]
    kw = {m: g(m, "all_keywords/morpheme") for m in models}
    acc = {m: lk(m, "preference_accuracy") for m in models}
    rep = g("sft_dpo", "seq_rep_4")
    if any(v is None for v in [*kw.values(), *acc.values(), rep, base_rep]):
        claims.append(Claim("SFT followed by DPO is the best recipe.", rule, "not evaluated", "a model is missing"))
    else:
        parts, verdicts = [], []
        for name, table in (("all three keywords", kw), ("preference accuracy", acc)):
            best = table["sft_dpo"]
            runner = max(table[m]["mean"] for m in models if m != "sft_dpo")
            verdicts.append("no" if best["mean"] <= runner else "yes" if best["low"] > runner else "overlap")
            parts.append(f"{name}: " + ", ".join(f"{LABELS[m]} {_fmt(table[m])}" for m in models))
        repeats = _higher(rep, base_rep) == "yes"
        parts.append(f"seq-rep-4: SFT→DPO {_fmt(rep, 3)}, base {_fmt(base_rep, 3)}")
        verdict = ("not supported" if "no" in verdicts or repeats else
                   "supported" if all(v == "yes" for v in verdicts) else "inconclusive")
        claims.append(Claim("SFT followed by DPO is the best recipe.", rule, verdict, "; ".join(parts)))
    return claims


# ---- plots ---------------------------------------------------------------------------------------------


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(tasks, path: Path) -> Path:
    """Training curves: SFT loss; DPO loss, reward margin and reward accuracy (DPO and SFT→DPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("SFT loss (token NLL)", "loss", ("sft",)), ("DPO loss", "loss", ("dpo", "sft_dpo")),
              ("DPO rewards/margins", "rewards/margins", ("dpo", "sft_dpo")),
              ("DPO rewards/accuracies", "rewards/accuracies", ("dpo", "sft_dpo"))]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = {"sft": "tab:orange", "dpo": "tab:green", "sft_dpo": "tab:purple"}
    for ax, (title, key, methods) in zip(axes, panels):
        for t in tasks:
            if t.kind != "train" or t.model not in methods:
                continue
            rows = _read_metrics(t.path / "metrics.jsonl")
            train = [(r["step"], r[key]) for r in rows if key in r]
            evals = [(r["step"], r[f"eval_{key}"]) for r in rows if f"eval_{key}" in r]
            if train:
                ax.plot(*zip(*train), color=colors[t.model], alpha=0.85, marker=".",
                        label=f"{LABELS[t.model]} seed {t.seed}")
            if evals:
                ax.plot(*zip(*evals), color=colors[t.model], marker="s", linestyle="none", markersize=7,
                        markerfacecolor="none", label=f"{LABELS[t.model]} seed {t.seed}, eval")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(summary: dict, path: Path) -> Path:
    """Bars with 95% intervals for the headline metrics; the chosen responses as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("greedy", "all_keywords/morpheme", "all three keywords (morpheme)"),
              ("greedy", "keyword_coverage/morpheme", "keyword coverage (morpheme)"),
              ("greedy", "prompt_echo", "prompt echo"), ("greedy", "seq_rep_4", "seq-rep-4"),
              ("greedy", "terminated", "ended with end-of-turn"),
              ("likelihood", "preference_accuracy", "preference accuracy")]
    models = [m for m in ("base", "sft", "dpo", "sft_dpo") if m in summary]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.6))
    for ax, (block, key, title) in zip(axes, panels):
        vals = [_get(summary, m, block, key) for m in models]
        xs = [i for i, v in enumerate(vals) if v is not None]
        means = [vals[i]["mean"] for i in xs]
        err = [[vals[i]["mean"] - vals[i]["low"] for i in xs], [vals[i]["high"] - vals[i]["mean"] for i in xs]]
        ax.bar(xs, means, yerr=err, capsize=4, color=["tab:gray", "tab:orange", "tab:green", "tab:purple"][:len(xs)])
        ref = _get(summary, "chosen", block, key)
        if ref is not None:
            ax.axhline(ref["mean"], color="black", linestyle="--", linewidth=1, label="chosen (data)")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(models)), [LABELS[m] for m in models], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(1.08, max(means + [0]) * 1.15))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- markdown ------------------------------------------------------------------------------------------


def _table(summary: dict, models: list[str], block: str, rows) -> list[str]:
    lines = ["| metric | " + " | ".join(LABELS[m] for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for key, label, d in rows:
        cells = []
        for m in models:
            v = summary.get(m, {}).get(block, {}).get(key)
            if isinstance(v, dict):
                cells.append("—" if any(math.isnan(x) for x in v.values()) else _fmt(v, d))
            elif isinstance(v, float):
                cells.append(f"{v:.{d}f}")
            else:
                cells.append("—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def comparison_lines(summary: dict, claims: Sequence[Claim], sampling: str, one_sample: bool) -> list[str]:
    """The claims table and the comparison tables: the part of a report that a merged summary also has."""
    models = [m for m in ("base", "sft", "dpo", "sft_dpo") if m in summary] + ["chosen"]
    lines = ["## Claims of the write-up, judged by the numbers", "",
             "| claim | verdict | rule | numbers |", "|---|---|---|---|"]
    lines += [f"| {c.claim} | **{c.verdict}** | {c.rule} | {c.evidence} |" for c in claims]
    lines += ["", "\"Inconclusive\": the direction agrees but the intervals overlap. Coherence and literary "
              "quality are not measured directly; preference accuracy (does the model rate the chosen "
              "passage above the rejected one, per token) stands in for the pull toward the chosen style.", "",
              "## Comparison table", "", "### Greedy outputs", ""]
    lines += _table(summary, models, "greedy", GEN_ROWS)
    if any("sample" in summary[m] for m in summary):
        lines += ["", f"### Sampled outputs ({sampling})", ""]
        lines += _table(summary, [m for m in models if m != "chosen"], "sample", GEN_ROWS)
        if one_sample:
            lines += ["", "Self-BLEU of samples compares the samples of one prompt: undefined with one sample."]
    lines += ["", "### Likelihood of the validation pairs", ""]
    lines += _table(summary, [m for m in models if m != "chosen"], "likelihood", LIK_ROWS)
    return lines


def merge(summaries: Sequence[tuple[str, dict]]) -> tuple[dict, dict]:
    """Several experiments' ``summary.json`` contents as one summary, so the claims can be judged across runs
    (a stage trained in another session or on another machine). A model found in more than one keeps the
    first one's numbers. Returns the merged summary and, per model, the name of the run it came from."""
    merged: dict = {}
    source: dict = {}
    for name, content in summaries:
        for model, blocks in content["summary"].items():
            if model not in merged:
                merged[model], source[model] = blocks, name
    return merged, source


def _quote(text: str, limit: int = 700) -> list[str]:
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return ["> " + (line if line.strip() else "") for line in (text or "(empty)").splitlines()]


def side_by_side(gens: dict, rows: Sequence[dict], count: int, seed: str) -> list[str]:
    from kwjax import metrics

    out = []
    for n, row in enumerate(rows[:count], 1):
        rid = str(row.get("id", ""))
        out += [f"### {n}. {', '.join(row.get('keywords') or [])} (`{rid}`)", "", "Prompt:", ""] + _quote(row["prompt"]) + [""]
        for m in ("base", "sft", "dpo", "sft_dpo", "chosen"):
            match = [g for g in gens.get(m, []) if g.mode == "greedy" and g.id == rid and g.run in (seed, "data")]
            if not match:
                continue
            g = match[0]
            note = ""
            if g.keywords:
                cov = metrics.keyword_coverage(g.text, g.prompt, g.keywords)
                note = (f" — keywords (morpheme) {sum(cov.hits['morpheme'])}/{len(g.keywords)}"
                        f"{', prompt echo' if cov.echo else ''}, seq-rep-4 {metrics.seq_rep_n(g.text, 4):.2f}"
                        + (f", stopped: {g.stop_reason}" if m != "chosen" else ""))
            out += [f"**{LABELS[m]}**{note}", ""] + _quote(g.text) + [""]
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _peak_line(tasks) -> list[str]:
    peaks = [t for t in tasks if t.peak_rss_mib]
    if not peaks:
        return []
    top = max(peaks, key=lambda t: t.peak_rss_mib)
    return [f"- Peak resident memory: {top.peak_rss_mib / 1024:.1f} GiB ({top.kind} {LABELS[top.model]}, seed "
            f"{top.seed}); per task in `experiment.json`."]


def _methods_line(config) -> str:
    """The methods this experiment trained (experiment.methods), each with what defines it."""
    parts = {"sft": "SFT",
             "dpo": f"DPO (β = {config.dpo.beta}, {config.dpo.loss_type})",
             "sft_dpo": "SFT→DPO (DPO from the SFT model, which is also its reference)"}
    return ", ".join(parts[m] for m in config.experiment.methods if m in parts)


def write(config, workdir: Path, tasks, rows: Sequence[dict], out_dir: Path, record: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gens, liks = collect(tasks, rows)
    summary = summarize(gens, liks)
    claims = judge_claims(summary)
    plot_curves(tasks, out_dir / "training_curves.png")
    plot_metrics(summary, out_dir / "metrics.png")
    atomic_write_text(out_dir / "summary.json", json.dumps(
        {"summary": summary, "claims": [dataclasses.asdict(c) for c in claims]}, indent=2, ensure_ascii=False))

    seeds = list(config.experiment.seeds)
    mach = record["machine"]
    task_seconds = sum(t.seconds or 0.0 for t in tasks)
    e = config.eval
    lines = [
        f"# Experiment report: {config.experiment.name}", "",
        config.experiment.note, "",
        f"- Base model: `{config.model}` ({config.dtype}); methods: " + _methods_line(config) + ".",
        f"- Training: batch {config.batch_size}, epochs per stage {config.epochs}, learning rates SFT "
        f"{config.sft.learning_rate:g} / DPO "
        f"{config.dpo.learning_rate:g} ({config.optimizer.schedule}), sequences up to {config.data.max_length} "
        f"tokens; steps per run: " + ", ".join(
            f"{LABELS[t.model]} {read_marker(t.path).get('final_step')}"
            for t in tasks if t.kind == "train" and t.seed == seeds[0]) + f" (seed {seeds[0]}).",
        "- DPO pairs: " + (f"`{config.data.preference_file}` (its split=train rows; split=validation for the "
                           "DPO stage's validation)" if config.data.get("preference_file", "") else
                           "the training data's own chosen/rejected passages (the shipped set: authored pairs)")
        + "; the evaluation's preference accuracy below is on the evaluation prompts' pairs.",
        f"- Evaluation: {len(rows)} validation prompts; greedy plus {e.num_samples} sample(s) per prompt "
        f"(temperature {e.temperature}, top-p {e.top_p}), up to {e.max_new_tokens} new tokens; seeds {seeds}.",
        f"- Machine: {mach['cpu']}, {mach['cpu_count']} cores; JAX {mach['jax']} on {mach['backend']} "
        f"({mach['devices']}).",
        f"- Wall time: {_minutes(task_seconds)} for the {len(tasks)} tasks as they ran"
        + (f" ({sum(1 for t in tasks if t.reused)} reused from an earlier invocation; this one took "
           f"{_minutes(record['wall_seconds_this_invocation'])})" if any(t.reused for t in tasks) else "")
        + "; per task in `experiment.json`.",
        *_peak_line(tasks),
        f"- Reproduce: `{record['command']}`" if record.get("command") else
        f"- Reproduce: `python scripts/experiment.py --config=configs/{config.experiment.name}.py`" if
        config.experiment.name in ("quick", "tiny") else
        "- Reproduce: `python scripts/experiment.py --config=configs/experiment.py`",
        "",
        "Every number is a mean over outputs (pooled over seeds) with a 95% bootstrap interval that resamples "
        "prompts. Keyword metrics ignore text copied from the prompt (10+ characters). `chosen (data)` is the "
        "validation set's chosen passages measured the same way: the level a model that learned the task "
        "would reach.", "",
    ]
    lines += comparison_lines(summary, claims, f"temperature {e.temperature}, top-p {e.top_p}",
                              one_sample=e.num_samples < 2)
    lines += ["", "## Plots", "", "![training curves](training_curves.png)", "", "![metrics](metrics.png)", "",
              f"## Side by side (greedy, seed {seeds[0]})", ""]
    lines += side_by_side(gens, rows, config.experiment.side_by_side, str(seeds[0]))
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
