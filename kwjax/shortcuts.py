"""Shortcut audit of a preference set: can one surface feature tell the chosen passage from the rejected?

DPO learns whatever separates chosen from rejected. If a cue as cheap as "the longer passage wins"
already ranks almost every pair, a model can fit the preference set by learning the cue instead of the
task (here: a literary passage that uses three keywords), and a high preference accuracy then says
nothing about the task. This module measures such cues for any list of (chosen, rejected) pairs.

Features (:func:`features`, one passage at a time; pure Python, no model, no tokenizer):

* ``chars``: characters (Unicode code points), spaces and line breaks included (as the data card counts).
* ``distinct_chars``: distinct characters, whitespace excluded (so layout does not count).
* ``words``: whitespace words (어절).
* ``lines``: non-empty lines.
* ``polite_endings``: sentences ending in the polite register; see :func:`polite_endings`.
* ``longest_repeat``: the longest n such that some word n-gram occurs twice; see :func:`longest_repeat`.
* ``repeated_4gram``: 1 if some word 4-gram occurs twice (``longest_repeat >= 4``), else 0.
* ``distinct2_chars`` / ``distinct2_words``: distinct-2 of the passage alone (unique bigrams / bigrams,
  :func:`kwjax.metrics.distinct_n`; characters with whitespace runs as one space, or whitespace words;
  0.0 for a passage with fewer than 2 such tokens, and near 1.0 for any short one, so it tracks length).
* ``definitions``: dictionary-definition sentences; see :func:`definition_sentences`.

Separability (:func:`pairwise_separability`, :func:`threshold_separability`, :func:`audit`):

* *pairwise*: the rule "the passage with the larger value is chosen", scored over pairs (a tie counts
  half), or its reverse, whichever is better: ``max(acc, 1 - acc)``. 0.5 = the feature says nothing about
  which passage of a pair is chosen; 1.0 = it ranks every pair. This is what a pairwise loss can exploit.
* *threshold*: the best single cut on the feature (either direction) labelling each of the 2N passages
  chosen or rejected on its own, accuracy over 2N. It says whether a passage can be judged without its
  pair (a reward model or a classifier could use it).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

from kwjax.metrics import distinct_n

__all__ = [
    "FEATURES", "LARGER", "SMALLER", "features", "sentences", "polite_endings", "longest_repeat",
    "definition_sentences", "pairwise_separability", "threshold_separability", "Separability", "Audit",
    "audit", "pairs_of",
]

LARGER, SMALLER = "larger is chosen", "smaller is chosen"

_SENT_END = re.compile(r"(?<=[.!?…])\s+")
# Punctuation and closing quotes/brackets stripped off a word before its ending is read.
_TRAIL = ".,!?…~·:;\"'”’)]」』>»"


def sentences(text: str) -> list[str]:
    """Non-empty lines, further split after sentence-final punctuation (. ! ? …), as the data card does."""
    return [s.strip() for line in text.splitlines() for s in _SENT_END.split(line) if s.strip()]


def _last_word(sentence: str) -> str:
    words = sentence.split()
    return words[-1].rstrip(_TRAIL) if words else ""


def _final_consonant(syllable: str) -> int:
    """Index of a Hangul syllable's final consonant (0 = none, 8 = ㄹ, 17 = ㅂ); -1 if not a syllable."""
    code = ord(syllable) - 0xAC00
    return code % 28 if 0 <= code < 11172 else -1


# Nouns that end in 요 and can close a (verbless) sentence; not a polite ending.
_YO_NOUNS = frozenset({"필요", "중요", "주요", "수요"})


def _is_polite(word: str) -> bool:
    if len(word) >= 3 and word[-2:] in ("니다", "니까"):
        # 습니다/습니까, or ㅂ니다/ㅂ니까 fused into the syllable before (합니다, 입니다, 됩니까).
        # 아니다 (plain "is not") and the connective -니까 (있으니까, "because") have no ㅂ there.
        return word[-3] == "습" or _final_consonant(word[-3]) == 17
    if len(word) >= 2 and word[-1] in "요죠" and word not in _YO_NOUNS:
        return _final_consonant(word[-2]) >= 0  # 세요, 해요, 어요, 예요, 네요, 군요, 죠 after a syllable
    return False


def polite_endings(text: str) -> int:
    """Number of sentences whose last word ends in the polite (존댓말) register.

    A sentence is a line or a part of one ending in . ! ? … (:func:`sentences`); its last word has
    trailing punctuation and closing quotes stripped. Polite: the word ends in 습니다/습니까, or in
    니다/니까 after a syllable with final ㅂ (합니다, 입니다, 갑니까), or in 요/죠 after a Hangul syllable
    (세요, 해요, 어요, 예요, 네요; 지요 → 죠). Not polite: 아니다, the connective -니까 (있으니까), the noun
    요 alone, and the nouns 필요/중요/주요/수요. A polite ending followed by a comma mid-sentence is not
    counted. The shipped chosen passages are plain register (해라체) almost throughout; off-topic advice
    and notices are polite, which is the cue measured.
    """
    return sum(_is_polite(_last_word(s)) for s in sentences(text))


def longest_repeat(text: str) -> int:
    """The largest n such that some whitespace-word n-gram occurs at least twice (overlaps allowed); 0 if
    no word repeats. 4 or more is degenerate repetition of a phrase, not a repeated particle or refrain word.
    """
    words = text.split()
    n = 0
    # If an (n+1)-gram repeats, so does its n-gram prefix: grow n while some n-gram still repeats.
    while n < len(words) - 1:
        grams = Counter(tuple(words[i:i + n + 1]) for i in range(len(words) - n))
        if max(grams.values()) < 2:
            break
        n += 1
    return n


_DEFINING_VERBS = ("말한다", "뜻한다", "의미한다", "가리킨다", "일컫는다")
_NOT_DEFINING = ("때문이다", "모양이다")  # cause, conjecture


def _is_definition(sentence: str) -> bool:
    words = [w.rstrip(_TRAIL) for w in sentence.split()]
    if len(words) < 2 or not words[0].endswith(("은", "는", "란")):
        return False
    last = words[-1]
    if last.endswith(_DEFINING_VERBS):
        return True
    if not last.endswith("이다") or last.endswith(_NOT_DEFINING):
        return False
    # "…ㄹ/을 것이다" is a conjecture (갈 것이다, 생겼을 것이다), not a definition.
    return not (last == "것이다" and words[-2] and _final_consonant(words[-2][-1]) == 8)


def definition_sentences(text: str) -> int:
    """Number of dictionary-definition sentences: "X는 …이다", "X란 …을 뜻한다".

    A sentence (:func:`sentences`) counts when its first word ends in the topic particle 은/는 or in
    란/이란, and its last word (trailing punctuation stripped) ends in 말한다, 뜻한다, 의미한다, 가리킨다
    or 일컫는다, or ends in 이다 but is not 때문이다 (a cause), 모양이다 or "ㄹ/을 것이다" (a conjecture).
    Only the written 이다 counts (기계이다, not 기계다). Metaphors of the same shape (다람쥐는 볼이
    저금통이다) count too: this is a surface cue, not a judgement of style.
    """
    return sum(_is_definition(s) for s in sentences(text))


def features(text: str) -> dict[str, float]:
    """All surface features of one passage, in :data:`FEATURES` order (see the module docstring)."""
    rep = longest_repeat(text)
    return {
        "chars": len(text),
        "distinct_chars": len({c for c in text if not c.isspace()}),
        "words": len(text.split()),
        "lines": sum(1 for line in text.splitlines() if line.strip()),
        "polite_endings": polite_endings(text),
        "longest_repeat": rep,
        "repeated_4gram": int(rep >= 4),
        "distinct2_chars": distinct_n([text], 2, unit="char"),
        "distinct2_words": distinct_n([text], 2, unit="word"),
        "definitions": definition_sentences(text),
    }


FEATURES = tuple(features(""))


def pairwise_separability(values: Sequence[tuple[float, float]]) -> tuple[float, float, str, int]:
    """For (chosen value, rejected value) pairs: ``(separability, correct, direction, ties)``.

    ``acc`` = the share of pairs whose chosen value is larger, a tie counting half; the better of the rule
    and its reverse is kept: separability ``max(acc, 1 - acc)``, ``correct`` = separability × N (a
    multiple of 0.5), direction :data:`LARGER` when ``acc >= 0.5`` else :data:`SMALLER`.
    """
    if not values:
        raise ValueError("no pairs")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in values)
    ties = sum(c == r for c, r in values)
    n = len(values)
    if wins * 2 >= n:
        return wins / n, wins, LARGER, ties
    return (n - wins) / n, n - wins, SMALLER, ties


def threshold_separability(chosen: Sequence[float], rejected: Sequence[float]) -> tuple[float, float, str]:
    """The best single cut labelling every passage on its own: ``(accuracy, cut, direction)``.

    Rule: a passage is chosen when its value is above ``cut`` (direction :data:`LARGER`) or below it
    (:data:`SMALLER`); ``cut`` is the midpoint between two adjacent distinct values, so equal values always
    get the same label. Accuracy is over all ``len(chosen) + len(rejected)`` passages. Labelling everything
    one way (a cut beyond every value) is a candidate too, so with N chosen and N rejected the result is at
    least 0.5. Among equally good cuts the lowest wins, LARGER before SMALLER.
    """
    total = len(chosen) + len(rejected)
    if not total:
        raise ValueError("no passages")
    points = sorted([(v, 1) for v in chosen] + [(v, 0) for v in rejected])
    # Sweep the cut upwards: `below_c` chosen and `below_r` rejected passages lie below it.
    n_c = len(chosen)
    below_c = below_r = 0
    lowest = points[0][0]
    best = (max(n_c, total - n_c) / total, lowest - 1.0, LARGER if n_c * 2 >= total else SMALLER)
    i = 0
    while i < len(points):
        v = points[i][0]
        while i < len(points) and points[i][0] == v:
            below_c += points[i][1]
            below_r += 1 - points[i][1]
            i += 1
        cut = (v + points[i][0]) / 2 if i < len(points) else v + 1.0
        larger = (n_c - below_c + below_r) / total   # above the cut is chosen
        for acc, direction in ((larger, LARGER), (1.0 - larger, SMALLER)):
            if acc > best[0] + 1e-12:
                best = (acc, cut, direction)
    return best


@dataclasses.dataclass(frozen=True)
class Separability:
    """How well one feature separates chosen from rejected; see the module docstring."""

    feature: str
    pairs: int                  # N
    chosen_mean: float
    rejected_mean: float
    pairwise: float             # max(acc, 1 - acc), ties half
    pairwise_correct: float     # pairwise × N
    direction: str              # LARGER or SMALLER
    ties: int                   # pairs with equal values
    threshold: float            # best single-cut accuracy over 2N passages
    cut: float
    threshold_direction: str


@dataclasses.dataclass(frozen=True)
class Audit:
    """Per-feature results in :data:`FEATURES` order, and the best single feature by pairwise separability
    (ties broken by threshold separability, then by feature order)."""

    results: tuple[Separability, ...]
    best: Separability

    def __getitem__(self, feature: str) -> Separability:
        for r in self.results:
            if r.feature == feature:
                return r
        raise KeyError(feature)


def audit(pairs: Iterable[tuple[str, str]]) -> Audit:
    """Audit (chosen, rejected) text pairs for single-feature shortcuts (every feature of :data:`FEATURES`)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs")
    feats = [(features(c), features(r)) for c, r in pairs]
    results = []
    for name in FEATURES:
        cv = [fc[name] for fc, _ in feats]
        rv = [fr[name] for _, fr in feats]
        sep, correct, direction, ties = pairwise_separability(list(zip(cv, rv)))
        t_acc, cut, t_dir = threshold_separability(cv, rv)
        results.append(Separability(name, len(pairs), sum(cv) / len(cv), sum(rv) / len(rv), sep, correct,
                                    direction, ties, t_acc, cut, t_dir))
    best = max(results, key=lambda r: (r.pairwise, r.threshold, -FEATURES.index(r.feature)))
    return Audit(tuple(results), best)


def pairs_of(records: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs from DPO records (``kwjax.data.load_records(path, "dpo")``, ``dpo_view``)."""
    return [(r["chosen"], r["rejected"]) for r in records]
