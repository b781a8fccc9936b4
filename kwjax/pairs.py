"""On-policy preference pairs: a model's own failures as the rejected passages.

The shipped pairs' rejected passages are written to fail (short, polite register, loops), so one surface
feature tells them apart (`kwjax.shortcuts`) and DPO on them learns that feature. Here the rejected
passage is something a real model wrote for the prompt and the evaluation's checks fail on, and the chosen
one is a passing output of the same model where there is one (else the authored passage), so the pair
differs in whether the task was done rather than in who wrote it.

Two steps, so the expensive one runs once:

* :func:`sample_candidates` generates the greedy output and ``samples`` seeded samples per prompt and
  scores each (:func:`score`); it appends to a JSONL file chunk by chunk and resumes from it.
* :func:`build_pairs` picks one pair per prompt from the scored candidates under :class:`PairRules`; every
  pair records its provenance (model, sampling settings, both passages' scores and where each came from).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Iterable, Sequence

from kwjax import metrics
from kwjax.files import atomic_write_text, jsonl_objects

__all__ = ["FAILURES", "PairRules", "SamplingPlan", "score", "failures", "sample_candidates",
           "read_candidates", "build_pairs", "write_pairs", "pass_rates", "PairsError"]

#: The checks a passage can fail, in the order they are reported.
FAILURES = ("missing_keyword", "echo", "no_stop", "repetition", "too_short")


_SEED_STRIDE = 1_000_003  # seeds of sample i and i + 1 never meet for data sets under a million rows


class PairsError(ValueError):
    """Candidates or settings that cannot make pairs (mismatched resume, no rows)."""


@dataclasses.dataclass(frozen=True)
class PairRules:
    """What makes a passage pass: the evaluation's checks with explicit thresholds."""

    level: str = "morpheme"  # keyword match level (kwjax.keywords)
    max_seq_rep_4: float = 0.25  # repeated word 4-grams: a looping passage is far above (SFT mean 0.04)
    min_chars: int = 60  # the shipped chosen passages are 136-321 characters


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """How candidates are drawn; stored with them so a resume with other settings is refused."""

    model: str
    samples: int = 2  # seeded samples per prompt, besides the greedy output
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8


def score(text: str, stop_reason: str, prompt: str, keywords: Sequence[str],
          kinds: Sequence[str] | None = None, *, level: str = "morpheme") -> dict:
    """The evaluation's per-output checks for one passage (keywords outside prompt echoes)."""
    cov = metrics.keyword_coverage(text, prompt, keywords, kinds=kinds, levels=(level,))
    return {
        "keywords_present": int(sum(cov.hits[level])),
        "all_keywords": cov.all_present(level),
        "echo": cov.echo,
        "terminated": bool(metrics.termination_values([stop_reason])[0]),
        "seq_rep_4": metrics.seq_rep_n(text, 4),
        "chars": len(text),
    }


def failures(scores: dict, rules: PairRules = PairRules()) -> list[str]:
    """The checks of :data:`FAILURES` this passage fails; empty = it passes."""
    failed = {
        "missing_keyword": not scores["all_keywords"],
        "echo": scores["echo"],
        "no_stop": not scores["terminated"],
        "repetition": scores["seq_rep_4"] > rules.max_seq_rep_4,
        "too_short": scores["chars"] < rules.min_chars,
    }
    return [f for f in FAILURES if failed[f]]


# --------------------------------------------------------------------------------------------------
# Step 1: candidates.


def _plan_path(path: Path) -> Path:
    return path.with_name(path.name + ".plan.json")


def read_candidates(path: str | Path) -> list[dict]:
    """The candidate rows of a JSONL file written by :func:`sample_candidates`; a bad line names itself."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"{path}: candidates file not found")
    out = []
    for n, row in jsonl_objects(path.read_text(encoding="utf-8"), lambda n, e: PairsError(
            f"{path}:{n}: not valid JSON ({e.msg}); delete the line to resample it")):
        missing = [f for f in ("id", "prompt", "keywords", "mode", "text", "scores") if f not in row]
        if missing:
            raise PairsError(f"{path}:{n}: candidate row lacks {missing}")
        out.append(row)
    return out


def sample_candidates(model, rows: Sequence[dict], plan: SamplingPlan, path: str | Path, *,
                      rules: PairRules = PairRules(), chunk: int = 32, progress: bool = True) -> list[dict]:
    """Greedy output + ``plan.samples`` samples for each row (fields id, prompt, keywords, optional
    keyword_kinds, split), scored, appended to ``path`` ``chunk`` prompts at a time.

    A rerun skips the prompts already in the file, so an interrupted build loses at most one chunk; a
    rerun with another plan is refused rather than mixing two models' candidates in one file.
    """
    from kwjax.sampling import Sampler, SamplingConfig

    path = Path(path)
    plan_file = _plan_path(path)
    if plan_file.exists():
        stored = json.loads(plan_file.read_text(encoding="utf-8"))
        if stored != dataclasses.asdict(plan):
            diff = {k: (stored.get(k), v) for k, v in dataclasses.asdict(plan).items() if stored.get(k) != v}
            raise PairsError(f"{path}: holds candidates drawn with other settings {diff} (stored, asked); "
                             f"use another output path or delete {path} and {plan_file}")
    elif path.exists() and path.stat().st_size:
        raise PairsError(f"{path}: exists without its {plan_file.name}; use another output path")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps(dataclasses.asdict(plan), indent=1))
    done = {r["id"] for r in read_candidates(path)} if path.exists() else set()
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise PairsError("row ids repeat; every prompt needs its own id")
    todo = [r for r in rows if str(r["id"]) not in done]
    position = {rid: i for i, rid in enumerate(ids)}
    sampler = Sampler(model, batch_size=plan.batch_size)
    runs = [("greedy", 0, SamplingConfig(plan.max_new_tokens, greedy=True))]
    runs += [("sample", i, SamplingConfig(plan.max_new_tokens, temperature=plan.temperature, top_p=plan.top_p,
                                          seed=plan.seed + i)) for i in range(plan.samples)]
    chunks = range(0, len(todo), chunk)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"candidates ({len(done)} prompts done before)", unit="chunk")
    for start in chunks:
        part = todo[start:start + chunk]
        lines = []
        first = position[str(part[0]["id"])]
        for mode, index, cfg in runs:
            # The sampler folds a row's place in the call into the seed; offsetting the seed by the chunk's
            # first row (and the sample index) gives every prompt its own stream, the same on a resume.
            seeded = dataclasses.replace(cfg, seed=cfg.seed * _SEED_STRIDE + first)
            outs = sampler.generate([r["prompt"] for r in part], seeded, chat=True)
            for row, s in zip(part, outs):
                kinds = row.get("keyword_kinds")
                sc = score(s.text, s.stop_reason, row["prompt"], row["keywords"], kinds, level=rules.level)
                lines.append({"id": str(row["id"]), "split": row.get("split", ""), "prompt": row["prompt"],
                              "keywords": list(row["keywords"]), "keyword_kinds": kinds, "mode": mode,
                              "sample_index": index, "text": s.text, "stop_reason": s.stop_reason,
                              "n_tokens": len(s.tokens), "scores": sc})
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return read_candidates(path)


# --------------------------------------------------------------------------------------------------
# Step 2: pairs.


def _group(candidates: Iterable[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in candidates:
        groups.setdefault(c["id"], []).append(c)
    return groups


def build_pairs(candidates: Sequence[dict], authored: dict[str, str], plan: SamplingPlan,
                rules: PairRules = PairRules(), *, seed: int = 0) -> tuple[list[dict], dict]:
    """One pair per prompt from its scored candidates; returns (pairs, summary).

    chosen: a passing candidate drawn at random (seeded), else the authored passage (``authored[id]``)
    when there is one; rejected: the failing candidate nearest the chosen one in length, so that length
    does not tell the two apart where the model also fails at a normal length. A prompt with no failing
    candidate, or with neither a passing candidate nor an authored passage, gives no pair; the summary
    counts why.
    """
    rng = random.Random(seed)
    pairs, skipped = [], {"all_candidates_pass": [], "nothing_passes_and_no_authored": []}
    for rid, group in _group(candidates).items():
        judged = [(c, failures(c["scores"], rules)) for c in group]
        passing = [c for c, f in judged if not f]
        failing = [(c, f) for c, f in judged if f]
        first = group[0]
        if passing:
            pick = rng.choice(passing)
            chosen, chosen_from, chosen_scores = pick["text"], f"{pick['mode']}:{pick['sample_index']}", pick["scores"]
        elif authored.get(rid):
            chosen, chosen_from = authored[rid], "authored"
            chosen_scores = score(chosen, "stop_token", first["prompt"], first["keywords"], first.get("keyword_kinds"),
                                  level=rules.level)
        else:
            skipped["nothing_passes_and_no_authored"].append(rid)
            continue
        if not failing:
            skipped["all_candidates_pass"].append(rid)
            continue
        rej, rej_failures = min(failing, key=lambda cf: (abs(cf[0]["scores"]["chars"] - len(chosen)),
                                                         cf[0]["mode"], cf[0]["sample_index"]))
        pairs.append({
            "id": rid, "split": first.get("split", ""), "prompt": first["prompt"], "keywords": first["keywords"],
            "keyword_kinds": first.get("keyword_kinds"), "chosen": chosen, "rejected": rej["text"],
            "provenance": {
                "sampling": dataclasses.asdict(plan), "rules": dataclasses.asdict(rules), "pick_seed": seed,
                "candidates": len(group), "passing": len(passing),
                "chosen_from": chosen_from, "chosen_scores": chosen_scores,
                "rejected_from": f"{rej['mode']}:{rej['sample_index']}", "rejected_scores": rej["scores"],
                "rejected_failures": rej_failures,
            },
        })
    summary = {"pairs": len(pairs), "prompts": len(_group(candidates)),
               "by_split": _count(p["split"] for p in pairs),
               "chosen_from": _count("authored" if p["provenance"]["chosen_from"] == "authored" else "sample"
                                     for p in pairs),
               "rejected_failures": _count(f for p in pairs for f in p["provenance"]["rejected_failures"]),
               "skipped": {k: len(v) for k, v in skipped.items()}, "skipped_ids": skipped}
    return pairs, summary


def pass_rates(candidates: Sequence[dict], rules: PairRules = PairRules()) -> dict:
    """Share of candidates failing each check, and passing all, by mode (greedy / sample)."""
    out = {}
    for mode in sorted({c["mode"] for c in candidates}):
        judged = [failures(c["scores"], rules) for c in candidates if c["mode"] == mode]
        out[mode] = {"n": len(judged), "pass": sum(not f for f in judged) / len(judged)}
        out[mode].update({f: sum(f in j for j in judged) / len(judged) for f in FAILURES})
    return out


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> None:
    """Pairs as JSONL in kwjax's prompt/chosen/rejected shape (`kwjax.data.load_records` reads it)."""
    atomic_write_text(Path(path), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
