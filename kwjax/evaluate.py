"""Evaluation of one model on the keyword task: generations, likelihoods, and the metrics over them.

Generation uses the sampler (greedy once, plus seeded samples per prompt); likelihoods use the same
response log-prob path as training, so validation NLL and preference accuracy here are the numbers
training would compute.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from kwjax import batching, metrics
from kwjax.sampling import Sampler, SamplingConfig
from kwjax.weights import LoadedModel


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 256
    num_samples: int = 4  # seeded samples per prompt, besides the greedy one
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8
    max_length: int = 512  # for likelihoods: prompt + response tokens


@dataclasses.dataclass
class Generation:
    id: str
    prompt: str
    keywords: list[str]
    mode: str  # "greedy" or "sample"
    sample_index: int
    text: str
    tokens: list[int]
    stop_reason: str


def generate(model: LoadedModel, rows: Sequence[dict], settings: EvalSettings, *, progress: bool = True
             ) -> list[Generation]:
    """Greedy output and `num_samples` seeded samples for every row (fields: prompt, keywords, id)."""
    sampler = Sampler(model, batch_size=settings.batch_size)
    prompts = [r["prompt"] for r in rows]
    out: list[Generation] = []
    runs = [("greedy", 0, SamplingConfig(settings.max_new_tokens, greedy=True))]
    runs += [("sample", i, SamplingConfig(settings.max_new_tokens, temperature=settings.temperature,
                                          top_p=settings.top_p, seed=settings.seed + i))
             for i in range(settings.num_samples)]
    for mode, index, cfg in runs:
        samples = sampler.generate(prompts, cfg, chat=True, progress=progress)
        for row, s in zip(rows, samples):
            out.append(Generation(str(row.get("id", "")), row["prompt"], list(row.get("keywords") or []), mode,
                                  index, s.text, s.tokens, s.stop_reason))
    return out


def sequence_logps(model: LoadedModel, seqs: Sequence[batching.Sequence_], batch_size: int, bucket: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of response-token log-probs, response token count) per sequence, float64 on the host."""
    from kwjax.train import _forward_logps

    fwd = jax.jit(lambda p, b: _forward_logps(model.module, p, b, 128)[1:3])
    logps, counts = np.zeros(len(seqs)), np.zeros(len(seqs))
    for start in range(0, len(seqs), batch_size):
        chunk = list(seqs[start:start + batch_size])
        batch = batching.collate(chunk, bucket, rows=batch_size)
        lp, n = jax.device_get(fwd(model.params, {k: np.asarray(v) for k, v in batch.items()}))
        logps[start:start + len(chunk)] = lp[:len(chunk)]
        counts[start:start + len(chunk)] = n[:len(chunk)]
    return logps, counts


def likelihood_metrics(model: LoadedModel, rows: Sequence[dict], settings: EvalSettings) -> dict:
    """Validation NLL and perplexity of the chosen responses, and preference accuracy on the pairs.

    Preference accuracy compares length-normalised log-probs, so it works for any model, base included,
    without a reference model.
    """
    tok = model.tokenizer
    pairs, _, report = batching.encode_dpo(tok, rows, settings.max_length, "truncate")
    chosen_lp, chosen_n = sequence_logps(model, [c for c, _ in pairs], settings.batch_size)
    rejected_lp, rejected_n = sequence_logps(model, [r for _, r in pairs], settings.batch_size)
    nll = -chosen_lp.sum() / chosen_n.sum()
    better = metrics.preference_wins(chosen_lp, chosen_n, rejected_lp, rejected_n)
    return {
        "nll_chosen": float(nll),
        "perplexity_chosen": float(math.exp(min(nll, 50.0))),
        "preference_accuracy": float(np.mean(better)),
        "preference_correct": better.astype(int).tolist(),
        "pairs": len(pairs),
        "truncated_pairs": len(report.truncated),
    }


def write_samples(path: Path, generations: Sequence[Generation]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for g in generations:
            f.write(json.dumps(dataclasses.asdict(g), ensure_ascii=False) + "\n")


INSTRUCTION = "다음 세 단어를 모두 넣어 문학적인 글을 한 편 써 주세요: {}"


def rows_from_keywords_file(path: str | Path) -> list[dict]:
    """Prompts for a plain keywords file (one JSON object per line with `keywords`), outside the data set."""
    from kwjax.data import DataError

    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {n}", None, f"not valid JSON ({e.msg})") from None
        kws = obj.get("keywords") if isinstance(obj, dict) else None
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
            raise DataError(path, f"line {n}", "keywords", "expected a non-empty list of strings")
        rows.append({"id": obj.get("id", f"{Path(path).name}#{n}"), "keywords": kws,
                     "prompt": obj.get("prompt") or INSTRUCTION.format(", ".join(kws))})
    if not rows:
        raise DataError(path, "", None, "no rows")
    return rows


def evaluate(model: LoadedModel, rows: Sequence[dict], settings: EvalSettings, output_dir: str | Path, *,
             progress: bool = True) -> dict:
    """Generations and every metric for one model; writes metrics.json and samples.jsonl."""
    output_dir = Path(output_dir)
    gens = generate(model, rows, settings, progress=progress)
    write_samples(output_dir / "samples.jsonl", gens)
    result: dict = {"model": model.source, "settings": dataclasses.asdict(settings), "prompts": len(rows)}
    for mode in ("greedy", "sample"):
        sel = [g for g in gens if g.mode == mode]
        if not sel:
            continue
        groups = [g.id or g.prompt for g in sel]
        values = metrics.generation_values([g.text for g in sel], [g.stop_reason for g in sel],
                                           groups=groups if mode == "sample" else None)
        cis = metrics.with_ci(values, groups, seed=settings.seed)
        with_kw = [g for g in sel if g.keywords]  # rows of users' files may have no keywords
        if with_kw:
            cov = [metrics.keyword_coverage(g.text, g.prompt, g.keywords) for g in with_kw]
            cis.update(metrics.with_ci(metrics.coverage_values(cov), [g.id or g.prompt for g in with_kw],
                                       seed=settings.seed))
        block = {name: {"mean": m, "low": lo, "high": hi} for name, (m, lo, hi) in cis.items()}
        texts = [g.text for g in sel]
        block["distinct_1"] = metrics.distinct_n(texts, 1)
        block["distinct_2"] = metrics.distinct_n(texts, 2)
        result[mode] = block
    if all("chosen" in r and "rejected" in r for r in rows):
        lik = likelihood_metrics(model, rows, settings)
        mean, low, high = metrics.bootstrap_ci(lik.pop("preference_correct"), seed=settings.seed)
        lik["preference_accuracy"] = {"mean": mean, "low": low, "high": high}
        result["likelihood"] = lik
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result
