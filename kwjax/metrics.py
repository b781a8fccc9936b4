"""Evaluation metrics for generated passages (pure Python/numpy; no model needed).

Token unit. Korean text is measured in whitespace tokens (어절, "words with their particles") by default:
it needs no tokenizer, so numbers are comparable across models with different vocabularies.
``unit="char"`` uses Unicode characters instead (whitespace runs count as one space), which is finer and
less sensitive to particles (바다를 vs 바다에서 share the 바다 characters). Pre-tokenised input (a list of
strings or model token ids) is used as is.

Sections: repetition/diversity (seq-rep-n, distinct-n, Self-BLEU, length, termination), keyword coverage
with prompt-echo exclusion, preference accuracy, and bootstrap intervals. Every per-output metric has a
``*_values`` form returning one number per output, so its mean can be reported with :func:`bootstrap_ci`
or, with several samples per prompt, :func:`grouped_bootstrap_ci`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections import Counter
from typing import Any, Hashable, Iterable, Mapping, Sequence, Union

import numpy as np

from kwjax.keywords import LEVELS, keyword_hits

__all__ = [
    "UNITS", "tokens_of", "ngrams", "seq_rep_n", "mean_seq_rep_n", "distinct_n",
    "SELF_BLEU_TOKENIZE", "self_bleu_values", "self_bleu", "length_values", "termination_values",
    "termination_rate", "generation_values", "generation_metrics",
    "ECHO_MIN_CHARS", "find_prompt_echo", "mask_prompt_echo", "Coverage", "keyword_coverage",
    "coverage_values", "coverage_summary",
    "preference_wins", "preference_accuracy", "reward_wins",
    "bootstrap_ci", "grouped_bootstrap_ci", "ratio_bootstrap_ci", "with_ci",
]

UNITS = ("word", "char")
TextOrTokens = Union[str, Sequence[Hashable]]

_WS = re.compile(r"\s+")


def tokens_of(text_or_tokens: TextOrTokens, unit: str = "word") -> list:
    """The token list a metric counts over: whitespace words, characters, or the given tokens."""
    if not isinstance(text_or_tokens, str):
        return list(text_or_tokens)
    if unit == "word":
        return text_or_tokens.split()
    if unit == "char":
        return list(_WS.sub(" ", text_or_tokens.strip()))
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    """All contiguous n-grams, in order (len(tokens) - n + 1 of them, or none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(text_or_tokens: TextOrTokens, n: int = 4, *, unit: str = "word") -> float:
    """seq-rep-n of one output (Welleck et al. 2020): 1 - unique n-grams / total n-grams.

    0 means no n-gram repeats; a passage that repeats one line over and over approaches 1. An output with
    fewer than n tokens has no n-grams and scores 0 (nothing repeats), so very short outputs should be
    judged by a length metric as well.
    """
    grams = ngrams(tokens_of(text_or_tokens, unit), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def mean_seq_rep_n(outputs: Iterable[TextOrTokens], n: int = 4, *, unit: str = "word") -> float:
    """seq-rep-n averaged over outputs (how the paper reports it)."""
    values = [seq_rep_n(o, n, unit=unit) for o in outputs]
    if not values:
        raise ValueError("no outputs")
    return sum(values) / len(values)


def distinct_n(outputs: Iterable[TextOrTokens], n: int, *, unit: str = "word") -> float:
    """distinct-n over a set of outputs (Li et al. 2016): unique n-grams / total n-grams, pooled.

    Pooled over all outputs of a model, so it falls both when each output repeats itself and when outputs
    repeat each other. 0.0 when there are no n-grams at all.
    """
    counts: Counter = Counter()
    for o in outputs:
        counts.update(ngrams(tokens_of(o, unit), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


# --------------------------------------------------------------------------------------------------
# Self-BLEU, length, termination: the per-model generation metrics.

# Self-BLEU tokenisation. "13a" (sacrebleu's default: split on whitespace, punctuation split off) gives
# whitespace words (어절), the same unit as seq-rep-n and distinct-n here. "char" was tried and rejected:
# Korean text shares so many syllables and endings (…었다, …는) that unrelated passages already score
# 20-40 char-BLEU against each other, and on the shipped data it ranked the flat, generic `rejected`
# passages as *more* diverse than the `chosen` ones (first 60 rows: char 22.9 vs 30.4; 13a 7.3 vs 3.8,
# the right way round). 13a under-counts overlap between 바다를 and 바다에서, so it measures reuse of whole
# phrases, which is the collapse Self-BLEU is meant to catch. Pass tokenize="char" (or "ko-mecab" if
# installed) to compare.
SELF_BLEU_TOKENIZE = "13a"


def _group_indices(groups: Sequence[Hashable] | None, n: int) -> list[list[int]]:
    """Indices per group, groups in order of first appearance; one group of everything when None."""
    if groups is None:
        return [list(range(n))]
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} values but {len(groups)} group labels")
    by_group: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return list(by_group.values())


def _leave_one_out_bleu(stats: list[tuple[Counter, int]], max_order: int) -> list[float]:
    """Sentence BLEU of each segment against all the others, in O(total n-grams) instead of O(N^2).

    Reproduces sacrebleu's sentence BLEU with several references (clip each n-gram count by its largest
    count in any reference; brevity penalty against the closest reference length, shorter on a tie; exp
    smoothing; effective order). The largest count over "all but i" is the overall largest unless segment
    i holds it alone, in which case it is the second largest, so keeping the top two per n-gram suffices.
    """
    from sacrebleu.metrics.bleu import BLEU

    top: dict[tuple, tuple[int, int, int]] = {}  # n-gram -> (largest count, its owner, second largest)
    for i, (counts, _) in enumerate(stats):
        for gram, c in counts.items():
            m1, owner, m2 = top.get(gram, (0, -1, 0))
            if c > m1:
                top[gram] = (c, i, m1)
            elif c > m2:
                top[gram] = (m1, owner, c)
    lengths = [length for _, length in stats]
    scores = []
    for i, (counts, hyp_len) in enumerate(stats):
        correct, total = [0] * max_order, [0] * max_order
        for gram, c in counts.items():
            m1, owner, m2 = top[gram]
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, m2 if owner == i else m1)
        others = lengths[:i] + lengths[i + 1 :]
        ref_len = min(others, key=lambda r: (abs(r - hyp_len), r))
        scores.append(BLEU.compute_bleu(correct, total, hyp_len, ref_len, smooth_method="exp",
                                        effective_order=True, max_ngram_order=max_order).score)
    return scores


def self_bleu_values(
    outputs: Sequence[str], *, groups: Sequence[Hashable] | None = None, tokenize: str = SELF_BLEU_TOKENIZE
) -> np.ndarray:
    """Per output, sacrebleu sentence BLEU (0-100) against all the other outputs as references.

    Higher means the outputs repeat each other (less diverse). With ``groups`` (e.g. prompt ids) each output
    is compared only with the other samples of its own group: sample diversity per prompt rather than
    sameness across prompts. An output with no other output to compare with gets NaN (undefined). The value
    grows with the number of references, so compare models only at equal numbers of outputs per group.
    Equals ``sacrebleu.sentence_bleu(o, others, tokenize=tokenize)`` (defaults: exp smoothing, effective
    order), computed in linear time; see :data:`SELF_BLEU_TOKENIZE` for the tokenisation choice.
    """
    from sacrebleu.metrics.bleu import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    outputs = list(outputs)
    if not all(isinstance(o, str) for o in outputs):
        raise TypeError("self_bleu_values takes output texts (str)")
    bleu = BLEU(tokenize=tokenize, effective_order=True)
    tokenizer, max_order = bleu.tokenizer, bleu.max_ngram_order
    # As sacrebleu preprocesses a segment: trailing whitespace off, then tokenise.
    stats = [extract_all_word_ngrams(tokenizer(o.rstrip()), 1, max_order) for o in outputs]
    values = np.full(len(outputs), np.nan)
    for idx in _group_indices(groups, len(outputs)):
        if len(idx) >= 2:
            values[idx] = _leave_one_out_bleu([stats[i] for i in idx], max_order)
    return values


def self_bleu(
    outputs: Sequence[str], *, groups: Sequence[Hashable] | None = None, tokenize: str = SELF_BLEU_TOKENIZE
) -> float:
    """Self-BLEU (Zhu et al. 2018): the mean of :func:`self_bleu_values` over outputs that have a value.

    NaN with fewer than two outputs (or no group with two), where diversity among outputs is undefined.
    """
    values = self_bleu_values(outputs, groups=groups, tokenize=tokenize)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def length_values(outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per output: ``chars`` (characters, each whitespace run counted as one space, ends stripped: the
    ``unit="char"`` count) and ``words`` (whitespace tokens). Length shows what other metrics hide: a
    one-line output has no repetition and may still cover its keywords."""
    outputs = list(outputs)
    return {
        "chars": np.array([len(tokens_of(o, "char")) for o in outputs], dtype=float),
        "words": np.array([len(tokens_of(o, "word")) for o in outputs], dtype=float),
    }


_STOP_REASONS = ("stop_token", "max_new_tokens")


def termination_values(stop_reasons: Iterable[Any]) -> np.ndarray:
    """1.0 where generation ended on a stop token, 0.0 where it hit the length limit.

    Takes the ``stop_reason`` strings of :class:`kwjax.sampling.Sample` (or the samples themselves). Any
    other value is an error rather than a silent 0, so a renamed reason cannot pass as "never stops".
    """
    out = []
    for r in stop_reasons:
        r = getattr(r, "stop_reason", r)
        if r not in _STOP_REASONS:
            raise ValueError(f"unknown stop_reason {r!r}; expected one of {_STOP_REASONS}")
        out.append(1.0 if r == "stop_token" else 0.0)
    return np.array(out, dtype=float)


def termination_rate(stop_reasons: Iterable[Any]) -> float:
    """Share of outputs that ended with the end-of-turn (stop) token before the length limit."""
    values = termination_values(stop_reasons)
    if not values.size:
        raise ValueError("no outputs")
    return float(values.mean())


def generation_values(
    outputs: Sequence[str],
    stop_reasons: Iterable[Any] | None = None,
    *,
    groups: Sequence[Hashable] | None = None,
    unit: str = "word",
    tokenize: str = SELF_BLEU_TOKENIZE,
) -> dict[str, np.ndarray]:
    """Per-output values of the generation metrics, for means with bootstrap intervals.

    Keys: ``seq_rep_2``/``_3``/``_4``, ``self_bleu`` (within ``groups`` when given), ``length_chars``,
    ``length_words`` and, with ``stop_reasons``, ``terminated``. distinct-n is pooled over all outputs, so it
    has no per-output value; see :func:`generation_metrics`.
    """
    outputs = list(outputs)
    values = {f"seq_rep_{n}": np.array([seq_rep_n(o, n, unit=unit) for o in outputs], dtype=float)
              for n in (2, 3, 4)}
    values["self_bleu"] = self_bleu_values(outputs, groups=groups, tokenize=tokenize)
    lengths = length_values(outputs)
    values["length_chars"], values["length_words"] = lengths["chars"], lengths["words"]
    if stop_reasons is not None:
        values["terminated"] = termination_values(stop_reasons)
        if len(values["terminated"]) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(values['terminated'])} stop reasons")
    return values


def generation_metrics(
    outputs: Sequence[str],
    stop_reasons: Iterable[Any] | None = None,
    *,
    groups: Sequence[Hashable] | None = None,
    unit: str = "word",
    tokenize: str = SELF_BLEU_TOKENIZE,
) -> dict[str, float]:
    """The means of :func:`generation_values` plus pooled ``distinct_1`` and ``distinct_2``.

    Keys as in :func:`generation_values` (``terminated`` is the termination rate); ``self_bleu`` is NaN with
    fewer than two outputs.
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("no outputs")
    values = generation_values(outputs, stop_reasons, groups=groups, unit=unit, tokenize=tokenize)
    out = {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in values.items()}
    out["distinct_1"] = distinct_n(outputs, 1, unit=unit)
    out["distinct_2"] = distinct_n(outputs, 2, unit=unit)
    return out


# --------------------------------------------------------------------------------------------------
# Keyword coverage with prompt-echo exclusion.

# A copy of the prompt counts as an echo from this many characters on (conventions.md: "stretches of 10+
# characters"). Long enough that a keyword with its quotes and particle ('흔들리다'가 is 7) is not an echo,
# short enough to catch a copied half of an instruction line.
ECHO_MIN_CHARS = 10

_WS_OR_CHAR = re.compile(r"\s+|.", re.S)


def _match_units(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text as matched for echoes: every whitespace run is one space; with each unit's span in text."""
    key, spans = [], []
    for m in _WS_OR_CHAR.finditer(text):
        key.append(" " if m.group().isspace() else m.group())
        spans.append(m.span())
    return "".join(key), spans


def find_prompt_echo(output: str, prompt: str, *, min_chars: int = ECHO_MIN_CHARS) -> list[tuple[int, int]]:
    """Spans of ``output`` copied verbatim from ``prompt``, as sorted, disjoint (start, end) pairs.

    The rule: both texts are NFC-normalised and each whitespace run (spaces, tabs, newlines) counts as one
    space, so a copy that only re-wraps lines is still a copy. A character of the output is echoed when it
    lies inside some stretch of at least ``min_chars`` such characters (whitespace included) that also occurs
    in the prompt. That is the union of all common substrings of length >= ``min_chars``, found as the union
    of the output's ``min_chars``-windows that occur in the prompt (every longer common substring is covered
    by its windows). Spans index the NFC form of ``output`` (the string itself for ordinary NFC text), and
    reach from the first to the last original character of the copied stretch.
    """
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")
    out_text = unicodedata.normalize("NFC", output)
    out_key, out_spans = _match_units(out_text)
    prompt_key, _ = _match_units(unicodedata.normalize("NFC", prompt))
    k = min_chars
    windows = {prompt_key[j : j + k] for j in range(len(prompt_key) - k + 1)}
    merged: list[list[int]] = []  # in units of out_key
    for i in range(len(out_key) - k + 1):
        if out_key[i : i + k] in windows:
            if merged and i <= merged[-1][1]:
                merged[-1][1] = i + k
            else:
                merged.append([i, i + k])
    return [(out_spans[a][0], out_spans[b - 1][1]) for a, b in merged]


def mask_prompt_echo(
    output: str, prompt: str, *, min_chars: int = ECHO_MIN_CHARS
) -> tuple[str, list[tuple[int, int]]]:
    """The output (NFC) with each echoed span replaced by a line break, and the spans.

    A line break, not deletion: deleting would glue the text on either side into new words (바 + echo + 다
    must not become 바다), and the morpheme analyser reads each line on its own.
    """
    text = unicodedata.normalize("NFC", output)
    spans = find_prompt_echo(text, prompt, min_chars=min_chars)
    pieces, pos = [], 0
    for a, b in spans:
        pieces += [text[pos:a], "\n"]
        pos = b
    pieces.append(text[pos:])
    return "".join(pieces), spans


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Keyword coverage of one output, counted outside prompt echoes.

    ``hits[level]`` holds one bool per keyword (in order) for each level computed; ``echo_spans`` are the
    masked spans (see :func:`find_prompt_echo`); ``remaining`` is the text the keywords were looked for in.
    """

    keywords: tuple[str, ...]
    hits: Mapping[str, tuple[bool, ...]]
    echo_spans: tuple[tuple[int, int], ...]
    remaining: str

    @property
    def echo(self) -> bool:
        """Whether the output contains a copy of the prompt (a stretch of ``min_chars`` or more)."""
        return bool(self.echo_spans)

    @property
    def echo_chars(self) -> int:
        """How many characters of the output were masked as echo."""
        return sum(b - a for a, b in self.echo_spans)

    def all_present(self, level: str) -> bool:
        """Whether every keyword is present at this level."""
        return all(self.hits[level])

    def rate(self, level: str) -> float:
        """Share of the keywords present at this level."""
        return sum(self.hits[level]) / len(self.hits[level])


def keyword_coverage(
    output: str,
    prompt: str,
    keywords: Sequence[str],
    *,
    kinds: Sequence[str | None] | None = None,
    levels: Sequence[str] = LEVELS,
    min_chars: int = ECHO_MIN_CHARS,
) -> Coverage:
    """Which keywords the output uses outside text copied from the prompt, at each level.

    Copying the instruction back "covers" every keyword (the base Gemma 3 270M does exactly that), so echoed
    spans are masked first (:func:`mask_prompt_echo`) and the keywords looked for in what remains, with
    :func:`kwjax.keywords.keyword_hits` at the surface and morpheme levels. ``kinds`` (the data set's
    ``keyword_kinds``) spares the noun/predicate guess. Pass the instruction itself as ``prompt``.
    """
    keywords = tuple(keywords)
    if not keywords:
        raise ValueError("no keywords")
    remaining, spans = mask_prompt_echo(output, prompt, min_chars=min_chars)
    hits = {level: tuple(keyword_hits(remaining, keywords, level, kinds)) for level in levels}
    return Coverage(keywords=keywords, hits=hits, echo_spans=tuple(spans), remaining=remaining)


def coverage_values(results: Sequence[Coverage]) -> dict[str, np.ndarray]:
    """Per-output values: ``keyword_coverage/<level>`` (share of its keywords present),
    ``all_keywords/<level>`` (1.0 if all present) and ``prompt_echo`` (1.0 if it echoes the prompt).

    The echo does not depend on the level, so it is reported once.
    """
    results = list(results)
    if not results:
        raise ValueError("no coverage results")
    levels = tuple(results[0].hits)
    if any(tuple(r.hits) != levels for r in results):
        raise ValueError("coverage results computed at different levels")
    values = {}
    for level in levels:
        values[f"keyword_coverage/{level}"] = np.array([r.rate(level) for r in results])
        values[f"all_keywords/{level}"] = np.array([float(r.all_present(level)) for r in results])
    values["prompt_echo"] = np.array([float(r.echo) for r in results])
    return values


def coverage_summary(results: Sequence[Coverage]) -> dict[str, float]:
    """Over many outputs: keyword coverage rate (share of keywords present, per keyword: with three keywords
    per output the mean of :meth:`Coverage.rate`), all-keywords rate, per level, and prompt-echo rate."""
    return {k: float(v.mean()) for k, v in coverage_values(results).items()}


# --------------------------------------------------------------------------------------------------
# Preference accuracy.


def preference_wins(
    chosen_logps: Sequence[float],
    chosen_tokens: Sequence[int],
    rejected_logps: Sequence[float],
    rejected_tokens: Sequence[int],
    *,
    length_normalized: bool = True,
) -> np.ndarray:
    """Per pair, 1.0 where the model prefers the chosen response strictly, else 0.0 (a tie is no win).

    Log-probs are sequence sums over response tokens (conventions.md). Length-normalised (divided by the
    token count) by default: a sum favours the shorter response, and chosen passages are usually longer,
    so a raw comparison would mostly measure length.
    """
    arrays = [np.asarray(a, dtype=float)
              for a in (chosen_logps, chosen_tokens, rejected_logps, rejected_tokens)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"expected four 1-D arrays of one length, got shapes {[a.shape for a in arrays]}")
    c_lp, c_n, r_lp, r_n = arrays
    if np.isnan(c_lp).any() or np.isnan(r_lp).any():
        raise ValueError("NaN log-prob")
    if (c_n <= 0).any() or (r_n <= 0).any():
        raise ValueError("token counts must be positive")
    if length_normalized:
        c_lp, r_lp = c_lp / c_n, r_lp / r_n
    return (c_lp > r_lp).astype(float)


def preference_accuracy(
    chosen_logps: Sequence[float],
    chosen_tokens: Sequence[int],
    rejected_logps: Sequence[float],
    rejected_tokens: Sequence[int],
    *,
    length_normalized: bool = True,
) -> float:
    """Share of pairs whose chosen response gets the strictly higher (length-normalised) log-prob.

    Needs no reference model, so it scores any model, the base included. Ties count in the denominator
    as non-wins, as TRL's ``rewards/accuracies`` does.
    """
    wins = preference_wins(chosen_logps, chosen_tokens, rejected_logps, rejected_tokens,
                           length_normalized=length_normalized)
    if not wins.size:
        raise ValueError("no pairs")
    return float(wins.mean())


def reward_wins(policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                reference_chosen: Sequence[float], reference_rejected: Sequence[float]) -> np.ndarray:
    """Per pair, 1.0 where DPO's implicit reward prefers chosen strictly: (π_c − ref_c) − (π_r − ref_r) > 0.

    Summed response log-probs (β > 0 scales the margin, not its sign), so this is TRL's
    ``rewards/accuracies`` measured after training on any pairs, e.g. held-out ones; a tie is no win.
    """
    arrays = [np.asarray(a, dtype=float) for a in (policy_chosen, policy_rejected, reference_chosen,
                                                    reference_rejected)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"expected four 1-D arrays of one length, got shapes {[a.shape for a in arrays]}")
    if any(np.isnan(a).any() for a in arrays):
        raise ValueError("NaN log-prob")
    pc, pr, rc, rr = arrays
    return (((pc - rc) - (pr - rr)) > 0).astype(float)


# --------------------------------------------------------------------------------------------------
# Bootstrap intervals.

_MAX_DRAWS = 1 << 22  # indices drawn per chunk, to bound memory with many values


def _check_values(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    if not v.size:
        raise ValueError("no values")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite (drop undefined ones, e.g. NaN Self-BLEU, first)")
    return v


def _percentile_interval(sums: np.ndarray, counts: np.ndarray, n_resamples: int, seed: int, alpha: float):
    """Percentile bootstrap of sum(sums)/sum(counts) over units resampled with replacement."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    mean = float(sums.sum() / counts.sum())
    units = len(sums)
    unit_means = sums / counts
    if units == 1 or (unit_means == unit_means[0]).all():
        return mean, mean, mean  # no spread to resample (and no float noise around a constant)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS // units)
    stats = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, units, size=(min(chunk, n_resamples - start), units))
        stats.append(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    low, high = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return mean, float(low), float(high)


def bootstrap_ci(
    values: Iterable[float], *, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap (1 - alpha) interval, seeded.

    Resamples values with replacement, so it assumes they are independent; with several samples per prompt
    use :func:`grouped_bootstrap_ci`, or the interval comes out too narrow.
    """
    v = _check_values(values)
    return _percentile_interval(v, np.ones_like(v), n_resamples, seed, alpha)


def grouped_bootstrap_ci(
    values: Iterable[float],
    groups: Sequence[Hashable],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Cluster bootstrap: like :func:`bootstrap_ci`, but resamples groups (prompts), not values.

    Samples of one prompt are correlated (same keywords, same difficulty), so the prompt is the unit of
    independence: each resample draws prompts with replacement and keeps all their samples. The statistic is
    the mean over all samples in the drawn groups, so the point estimate is the plain mean of ``values``.
    With one value per group it gives exactly :func:`bootstrap_ci`'s answer.
    """
    v = _check_values(values)
    idx = _group_indices(groups, len(v))
    sums = np.array([v[i].sum() for i in idx])
    counts = np.array([float(len(i)) for i in idx])
    return _percentile_interval(sums, counts, n_resamples, seed, alpha)


def ratio_bootstrap_ci(
    numerators: Iterable[float],
    denominators: Iterable[float],
    groups: Sequence[Hashable] | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """sum(numerators) / sum(denominators) with a bootstrap interval over units (or groups of them).

    For token-weighted means such as NLL per token: each pair contributes its summed NLL and its token
    count, and resampling pairs (not tokens) respects that a passage's tokens are not independent.
    """
    num, den = _check_values(numerators), _check_values(denominators)
    if num.shape != den.shape:
        raise ValueError(f"{len(num)} numerators but {len(den)} denominators")
    if (den <= 0).any():
        raise ValueError("denominators must be positive")
    idx = _group_indices(groups, len(num)) if groups is not None else [[i] for i in range(len(num))]
    sums = np.array([num[i].sum() for i in idx])
    counts = np.array([den[i].sum() for i in idx])
    return _percentile_interval(sums, counts, n_resamples, seed, alpha)


def with_ci(
    values: Mapping[str, Iterable[float]],
    groups: Sequence[Hashable] | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float, float]]:
    """(mean, low, high) for each named per-output array, e.g. from :func:`coverage_values` and
    :func:`generation_values`; grouped when ``groups`` is given.

    NaN entries (a metric undefined for that output, such as Self-BLEU of a prompt's only sample) are left
    out, with their group labels; a metric with no defined value gets (nan, nan, nan).
    """
    out = {}
    for name, vals in values.items():
        v = np.asarray(list(vals) if not isinstance(vals, np.ndarray) else vals, dtype=float)
        keep = ~np.isnan(v)
        if not keep.any():
            out[name] = (math.nan, math.nan, math.nan)
        elif groups is None:
            out[name] = bootstrap_ci(v[keep], n_resamples=n_resamples, seed=seed, alpha=alpha)
        else:
            g = list(groups)
            if len(g) != len(v):
                raise ValueError(f"{name}: {len(v)} values but {len(g)} group labels")
            kept_groups = [x for x, k in zip(g, keep) if k]
            out[name] = grouped_bootstrap_ci(v[keep], kept_groups, n_resamples=n_resamples, seed=seed,
                                             alpha=alpha)
    return out
