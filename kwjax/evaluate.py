"""Evaluation of one model on the keyword task: generations, likelihoods, and the metrics over them.

Generation uses the sampler (greedy once, plus seeded samples per prompt); likelihoods use the same
response log-prob path as training, so validation NLL and preference accuracy here are the numbers
training would compute.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from kwjax import batching, metrics
from kwjax.files import atomic_path, atomic_write_text, jsonl_objects
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
    run: str = ""  # which run of a pooled evaluation (e.g. the training seed)


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


@functools.partial(jax.jit, static_argnames=("module",))
def _summed_logps(module, params, batch):
    """Compiled once per module and shape, so every evaluation of a run reuses the first one's program."""
    from kwjax.step import forward_logps

    return forward_logps(module, params, batch, 128)[1:3]


def sequence_logps(model: LoadedModel, seqs: Sequence[batching.Sequence_], batch_size: int, bucket: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of response-token log-probs, response token count) per sequence, float64 on the host."""
    logps, counts = np.zeros(len(seqs)), np.zeros(len(seqs))
    for start in range(0, len(seqs), batch_size):
        chunk = list(seqs[start:start + batch_size])
        batch = batching.collate(chunk, bucket, rows=batch_size)
        lp, n = jax.device_get(_summed_logps(model.module, model.params,
                                             {k: np.asarray(v) for k, v in batch.items()}))
        logps[start:start + len(chunk)] = lp[:len(chunk)]
        counts[start:start + len(chunk)] = n[:len(chunk)]
    return logps, counts


@dataclasses.dataclass
class PairLikelihood:
    """Summed response log-probs and token counts of one validation pair under one model."""

    id: str
    chosen_logp: float
    chosen_tokens: int
    rejected_logp: float
    rejected_tokens: int
    run: str = ""


def pair_likelihoods(model: LoadedModel, rows: Sequence[dict], settings: EvalSettings) -> list[PairLikelihood]:
    tok = model.tokenizer
    pairs, ids, _ = batching.encode_dpo(tok, rows, settings.max_length, "truncate")
    chosen_lp, chosen_n = sequence_logps(model, [c for c, _ in pairs], settings.batch_size)
    rejected_lp, rejected_n = sequence_logps(model, [r for _, r in pairs], settings.batch_size)
    return [PairLikelihood(str(i), float(a), int(b), float(c), int(d))
            for i, a, b, c, d in zip(ids, chosen_lp, chosen_n, rejected_lp, rejected_n)]


def _wins(lik: Sequence[PairLikelihood]) -> np.ndarray:
    return metrics.preference_wins([p.chosen_logp for p in lik], [p.chosen_tokens for p in lik],
                                   [p.rejected_logp for p in lik], [p.rejected_tokens for p in lik])


def write_jsonl(path: Path, items: Sequence) -> None:
    """Dataclasses to JSONL, written to a temporary name first so a reader never sees half a file."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")


def write_samples(path: Path, generations: Sequence[Generation]) -> None:
    write_jsonl(path, generations)


def read_jsonl(path: Path, cls):
    with Path(path).open(encoding="utf-8") as f:
        return [cls(**json.loads(line)) for line in f if line.strip()]


INSTRUCTION = "다음 세 단어를 모두 넣어 문학적인 글을 한 편 써 주세요: {}"


def rows_from_keywords_file(path: str | Path) -> list[dict]:
    """Prompts for a plain keywords file (one JSON object per line with `keywords`), outside the data set."""
    from kwjax.data import DataError

    rows = []
    for n, obj in jsonl_objects(Path(path).read_text(encoding="utf-8"),
                                lambda n, e: DataError(path, f"line {n}", None, f"not valid JSON ({e.msg})")):
        kws = obj.get("keywords") if isinstance(obj, dict) else None
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
            raise DataError(path, f"line {n}", "keywords", "expected a non-empty list of strings")
        rows.append({"id": obj.get("id", f"{Path(path).name}#{n}"), "keywords": kws,
                     "prompt": obj.get("prompt") or INSTRUCTION.format(", ".join(kws))})
    if not rows:
        raise DataError(path, "", None, "no rows")
    return rows


def _block(cis: dict) -> dict:
    return {name: {"mean": m, "low": lo, "high": hi} for name, (m, lo, hi) in cis.items()}


def summarize(generations: Sequence[Generation], likelihoods: Sequence[PairLikelihood] = (), *,
              seed: int = 0) -> dict:
    """Every metric, each mean with a prompt-grouped bootstrap 95% interval.

    Works on one evaluation or on several pooled (`run` labels, e.g. training seeds): intervals resample
    prompts, so several runs' outputs for one prompt count as one unit; Self-BLEU compares a greedy output
    with the other prompts' outputs of its own run, and a sample with the other samples of its prompt;
    distinct-n is pooled within a run and averaged over runs.
    """
    result: dict = {}
    for mode in ("greedy", "sample"):
        sel = [g for g in generations if g.mode == mode]
        if not sel:
            continue
        prompt_of = [g.id or g.prompt for g in sel]
        bleu_groups = [g.run for g in sel] if mode == "greedy" else prompt_of
        values = metrics.generation_values([g.text for g in sel], [g.stop_reason for g in sel],
                                           groups=bleu_groups)
        cis = metrics.with_ci(values, prompt_of, seed=seed)
        with_kw = [(g, p) for g, p in zip(sel, prompt_of) if g.keywords]  # users' prompts may have none
        if with_kw:
            cov = [metrics.keyword_coverage(g.text, g.prompt, g.keywords) for g, _ in with_kw]
            cis.update(metrics.with_ci(metrics.coverage_values(cov), [p for _, p in with_kw], seed=seed))
        block = _block(cis)
        runs = sorted({g.run for g in sel})
        for n in (1, 2):
            block[f"distinct_{n}"] = float(np.mean([metrics.distinct_n([g.text for g in sel if g.run == r], n)
                                                    for r in runs]))
        result[mode] = block
    if likelihoods:
        groups = [p.id for p in likelihoods]
        nll = metrics.ratio_bootstrap_ci([-p.chosen_logp for p in likelihoods],
                                         [p.chosen_tokens for p in likelihoods], groups, seed=seed)
        acc = metrics.grouped_bootstrap_ci(_wins(likelihoods), groups, seed=seed)
        result["likelihood"] = {
            **_block({"nll_chosen": nll, "preference_accuracy": acc}),
            "perplexity_chosen": {k: float(math.exp(min(v, 50.0))) for k, v in zip(("mean", "low", "high"), nll)},
            "pairs": len(set(groups)),
        }
    return result


# What a per-epoch evaluation logs (greedy means): does the model stop, echo, use the keywords, loop?
EPOCH_METRICS = {"terminated": "gen_terminated", "prompt_echo": "gen_prompt_echo",
                 "all_keywords/morpheme": "gen_all_keywords_morpheme", "seq_rep_4": "gen_seq_rep_4",
                 "length_chars": "gen_length_chars", "distinct_2": "gen_distinct_2"}


def epoch_hook(model: LoadedModel, rows: Sequence[dict], settings: EvalSettings, directory: str | Path):
    """`on_epoch` for `kwjax.train.train`: the greedy outputs of the model being trained for `rows` after
    every epoch, written to DIRECTORY/epochs/epoch_<e>.jsonl, their means logged with the epoch's step.

    This is how one sees at which epoch SFT starts to loop or learns to stop, without a checkpoint per
    epoch. `model` gives the architecture and tokenizer; the parameters are the hook's argument.
    """
    greedy_only = dataclasses.replace(settings, num_samples=0, batch_size=min(settings.batch_size, len(rows)))
    directory = Path(directory)

    def hook(epoch: int, step: int, params) -> dict:
        current = LoadedModel(model.config, params, model.tokenizer, f"{directory} (epoch {epoch})")
        gens = generate(current, rows, greedy_only, progress=False)
        for g in gens:
            g.run = f"epoch {epoch}"
        write_samples(directory / "epochs" / f"epoch_{epoch}.jsonl", gens)
        block = summarize(gens, seed=settings.seed)["greedy"]
        return {name: float(block[key]["mean"] if isinstance(block[key], dict) else block[key])
                for key, name in EPOCH_METRICS.items() if key in block}

    return hook


def evaluate(model: LoadedModel, rows: Sequence[dict], settings: EvalSettings, output_dir: str | Path, *,
             progress: bool = True, run: str = "") -> dict:
    """Generations and every metric for one model: metrics.json, samples.jsonl and likelihoods.jsonl.

    Files are written only when complete, so an interrupted evaluation leaves no metrics.json and a
    rerun (the experiment's reuse check) evaluates again.
    """
    import time

    output_dir = Path(output_dir)
    timings, t = {}, time.perf_counter()
    gens = generate(model, rows, settings, progress=progress)
    for g in gens:
        g.run = run
    timings["generation"], t = round(time.perf_counter() - t, 2), time.perf_counter()
    lik: list[PairLikelihood] = []
    if all("chosen" in r and "rejected" in r for r in rows):
        lik = pair_likelihoods(model, rows, settings)
        for p in lik:
            p.run = run
    timings["likelihoods"], t = round(time.perf_counter() - t, 2), time.perf_counter()
    write_samples(output_dir / "samples.jsonl", gens)
    if lik:
        write_jsonl(output_dir / "likelihoods.jsonl", lik)
    result: dict = {"model": model.source, "settings": dataclasses.asdict(settings), "prompts": len(rows),
                    **summarize(gens, lik, seed=settings.seed)}
    timings["metrics_and_save"] = round(time.perf_counter() - t, 2)
    result["timings"] = timings  # wall seconds (generation includes its compiles)
    atomic_write_text(output_dir / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False))
    return result
