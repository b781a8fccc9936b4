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

from kwjax import batching
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
    better = chosen_lp / chosen_n > rejected_lp / rejected_n
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
