"""Evaluation metrics for generated passages (pure Python/numpy; no model needed).

Token unit. Korean text is measured in whitespace tokens (어절, "words with their particles") by default:
it needs no tokenizer, so numbers are comparable across models with different vocabularies.
``unit="char"`` uses Unicode characters instead (whitespace runs count as one space), which is finer and
less sensitive to particles (바다를 vs 바다에서 share the 바다 characters). Pre-tokenised input (a list of
strings or model token ids) is used as is.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Hashable, Iterable, Sequence, Union

__all__ = ["UNITS", "tokens_of", "ngrams", "seq_rep_n", "mean_seq_rep_n", "distinct_n"]

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
