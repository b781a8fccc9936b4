"""Is a keyword present in a Korean text? Two answers: surface and morpheme level.

Korean glues particles and endings onto words (바다를, 바다에서; 흔들리는, 흔들렸다), so a plain
substring test both under- and over-counts. kwjax reports two levels, side by side:

* ``surface``: string matching only, no analyser. A noun keyword must occur as a substring. A verb or
  adjective keyword (dictionary form, 흔들리다) matches through its stem (흔들리) *or* the stem with its
  last syllable fused with an ending by regular Hangul rules (흔들린, 흔들렸, 기다려, 사랑해) or by the
  common irregular conjugations (흘러, 추워, 걸어, 하얀, 잠든). The plain "stem as substring" test would
  reject 흔들렸다 for 흔들리다, which is why the fused forms are listed; see :func:`surface_forms`.
* ``morpheme``: Kiwi (PyPI ``kiwipiepy``) analyses the text into morphemes. A noun keyword matches a
  noun morpheme, or a word's noun part (what precedes its particles) that is the keyword or a compound
  headed by it: Korean compounds are right-headed, so 밤바다 contains 바다, but 등대지기 (a keeper) does
  not contain 등대, nor 눈물 눈. A verb/adjective keyword matches the lemma of a VV/VA morpheme
  (흔들리는 -> 흔들리/VV), including 하다-verbs (사랑했다 -> 사랑/NNG 하/XSV) and compound verbs
  (흘러가는 -> 흐르/VV + 가/VX). Each line and sentence is analysed on its own, and near-tie readings
  are kept (see ``_TIE_NATS``), so one analyser guess does not decide alone.

The evaluation (keyword coverage) reuses these functions; both levels are reported because each errs in
its own way (surface: 산 inside 산책; morpheme: analyser mistakes on unusual spellings).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable, Sequence

__all__ = [
    "LEVELS",
    "KINDS",
    "keyword_present",
    "keyword_hits",
    "is_predicate",
    "surface_forms",
    "kiwi",
]

LEVELS = ("surface", "morpheme")
# Kinds of keyword in the shipped data set; "verb"/"adjective" keywords are in dictionary form (…다).
KINDS = ("concrete", "abstract", "verb", "adjective")
_PREDICATE_KINDS = frozenset({"verb", "adjective"})
_NOUN_KINDS = frozenset({"concrete", "abstract", "noun"})


@functools.lru_cache(maxsize=1)
def kiwi():
    """The one shared Kiwi analyser, built on first use (loading its model takes about a second)."""
    from kiwipiepy import Kiwi

    return Kiwi()


def _nfc(s: str) -> str:
    # Decomposed Hangul (jamo sequences, e.g. from macOS file names) must compare equal to composed text.
    return unicodedata.normalize("NFC", s)


# --------------------------------------------------------------------------------------------------
# Hangul syllable arithmetic (Unicode: syllable = 0xAC00 + (initial*21 + vowel)*28 + final).
_S_BASE, _S_END = 0xAC00, 0xD7A3
# Vowel indices used below.
_A, _AE, _YA, _YAE, _EO, _YEO, _O, _WA, _WAE, _OE, _U, _WO, _EU, _I = 0, 1, 2, 3, 4, 6, 8, 9, 10, 11, 13, 14, 18, 20
# Final-consonant indices used below.
_NONE, _T_D, _T_N, _T_L, _T_M, _T_B, _T_S, _T_SS, _T_H = 0, 7, 4, 8, 16, 17, 19, 20, 27
_L_H = 18  # initial ㅎ


def _split(ch: str) -> tuple[int, int, int] | None:
    code = ord(ch)
    if not _S_BASE <= code <= _S_END:
        return None
    i = code - _S_BASE
    return i // 588, (i % 588) // 28, i % 28


def _join(initial: int, vowel: int, final: int = _NONE) -> str:
    return chr(_S_BASE + (initial * 21 + vowel) * 28 + final)


# Vowel contractions of a coda-less stem with the ending 아/어/여: 기다리+어 -> 기다려, 보+아 -> 봐,
# 쓰+어 -> 써, 아프+아 -> 아파, 되+어 -> 돼. 하+여 -> 해 is handled separately (needs initial ㅎ).
_CONTRACT = {_I: (_YEO,), _O: (_WA,), _U: (_WO,), _EU: (_EO, _A), _OE: (_WAE,)}


def _stem_forms(stem: str) -> set[str]:
    """The stem plus the spellings its last syllable takes when an ending fuses with it."""
    forms = {stem}
    parts = _split(stem[-1]) if stem else None
    if parts is None:
        return forms
    prefix = stem[:-1]
    ini, vow, fin = parts
    bare = prefix + _join(ini, vow)
    if fin == _NONE:
        # An ending's consonant becomes the final: 기다린, 기다릴, 기다림, 기다립니다, 갔다.
        forms.update(prefix + _join(ini, vow, f) for f in (_T_N, _T_L, _T_M, _T_B, _T_SS))
        contracted = list(_CONTRACT.get(vow, ()))
        if ini == _L_H and vow == _A:  # 하다-verbs: 사랑해, 사랑했다
            contracted.append(_AE)
        for v in contracted:
            forms.add(prefix + _join(ini, v))
            forms.add(prefix + _join(ini, v, _T_SS))
        # 르-irregular: 흐르+어 -> 흘러, 모르+아 -> 몰라.
        if stem[-1] == "르" and prefix and (p := _split(prefix[-1])) and p[2] == _NONE:
            head = prefix[:-1] + _join(p[0], p[1], _T_L)
            forms.update(head + tail for tail in ("러", "라", "렀", "랐"))
    elif fin == _T_H:  # ㅎ-irregular adjectives: 하얗다 -> 하얀, 하얘; 파랗다 -> 파란, 파래
        forms.update(prefix + _join(ini, vow, f) for f in (_T_N, _T_L, _T_M))
        for v in (_AE, _YAE):
            forms.update((prefix + _join(ini, v), prefix + _join(ini, v, _T_SS)))
    elif fin == _T_B:  # ㅂ-irregular: 춥다 -> 추운, 추워; 돕다 -> 도와
        forms.update(bare + t for t in ("우", "운", "울", "움", "워", "웠", "와", "왔"))
    elif fin == _T_D:  # ㄷ-irregular: 걷다 -> 걸어, 걸으며; 듣다 -> 들었다
        head = prefix + _join(ini, vow, _T_L)
        forms.update(head + t for t in ("어", "아", "었", "았", "으", "은", "을", "음"))
    elif fin == _T_S:  # ㅅ-irregular: 낫다 -> 나아; 짓다 -> 지은
        forms.update(bare + t for t in ("아", "어", "았", "었", "으", "은", "을", "음"))
    elif fin == _T_L:  # ㄹ drops before ㄴ/ㅂ/ㅅ: 잠들다 -> 잠든, 잠드는, 잠듭니다; 머물다 -> 머무는
        forms.update(bare + t for t in ("는", "니", "세", "시"))
        forms.add(prefix + _join(ini, vow, _T_N))
        forms.add(prefix + _join(ini, vow, _T_B) + "니")
    return forms


# --------------------------------------------------------------------------------------------------
# Kiwi analysis, and the kind of a keyword.

# Analyses whose log-probability is within this many nats of Kiwi's best are kept as well: near-ties are
# guesses (내 피로도 reads as 피로+도 or 피+로+도 with scores -59.9 vs -59.8), and a keyword counts if any
# kept reading contains it. Wider gaps are real preferences (유성우 as one noun vs 유성+우: 4.6 nats).
_TIE_NATS = 2.0
_SENT_BREAK = re.compile(r"(?<=[.!?…])\s+")

Tok = tuple  # (form, tag, start, length): start is an offset into the analysed text


@functools.lru_cache(maxsize=4096)
def _analyse(text: str, split_complex: bool) -> tuple[tuple[Tok, ...], ...]:
    """Kiwi readings of the text, one tuple of tokens per (sentence, kept reading); cached per text.

    Each line and each sentence is analysed on its own: Kiwi otherwise reads across a poem's line break
    (있다⏎고요는 became 있+다+이+고+요+는).
    """
    readings = []
    for line in re.finditer(r"[^\n]+", text):
        pos = line.start()
        for chunk in _SENT_BREAK.split(line.group()):
            offset = text.index(chunk, pos) if chunk else pos
            pos = offset + len(chunk)
            if not chunk.strip():
                continue
            results = kiwi().analyze(chunk, top_n=3, split_complex=split_complex)
            best = results[0][1]
            for toks, score in results:
                if score >= best - _TIE_NATS:
                    readings.append(tuple((t.form, t.tag, t.start + offset, t.len) for t in toks))
    return tuple(dict.fromkeys(readings))  # drop repeats, keep order


def _words(text: str) -> list[tuple[int, int]]:
    """Whitespace-delimited words (어절) as (start, end) spans."""
    return [m.span() for m in re.finditer(r"\S+", text)]


def _is_ending(tag: str) -> bool:
    return tag.startswith("E")


def _is_pred_tag(tag: str) -> bool:
    # VV/VA/VX (with Kiwi's -I/-R irregular marks) and the 하다-suffixes XSV/XSA.
    return tag[:2] in ("VV", "VA", "VX") or tag in ("XSV", "XSA")


def is_predicate(keyword: str, kind: str | None = None) -> bool:
    """Whether the keyword is a verb/adjective (dictionary form) rather than a noun.

    With ``kind`` given ("verb"/"adjective" vs "concrete"/"abstract"/"noun") no analysis is needed. Without
    it, a keyword ending in 다 is a predicate only if Kiwi reads it as stem + 다 (흔들리다), so that nouns
    ending in 다 (바다) stay nouns.
    """
    if kind is not None:
        if kind in _PREDICATE_KINDS:
            return True
        if kind in _NOUN_KINDS:
            return False
        raise ValueError(f"unknown keyword kind {kind!r}; expected one of {KINDS + ('noun',)}")
    keyword = _nfc(keyword.strip())
    if not keyword.endswith("다") or len(keyword) < 2:
        return False
    toks = _analyse(keyword, False)[0]
    return len(toks) >= 2 and toks[-1][0] == "다" and _is_ending(toks[-1][1]) and _is_pred_tag(toks[-2][1])


def _stem(keyword: str) -> str:
    return keyword[:-1] if keyword.endswith("다") and len(keyword) > 1 else keyword


def surface_forms(keyword: str, kind: str | None = None) -> frozenset[str]:
    """The strings whose presence counts as the keyword at surface level.

    A noun is itself. A verb/adjective is its stem and the fused spellings of its last syllable
    (see the module docstring); e.g. 기다리다 -> {기다리, 기다린, 기다릴, 기다림, 기다립, 기다렸, 기다려, …}.
    """
    keyword = _nfc(keyword.strip())
    if not is_predicate(keyword, kind):
        return frozenset({keyword})
    return frozenset(_stem_forms(_stem(keyword)))


# --------------------------------------------------------------------------------------------------
# Morpheme level.


def _coarse(tag: str) -> str:
    # Compare tags loosely: the analyser may call the same noun NNG in one context and NNP in another,
    # a stem VV-I in one and VV in another, an ending EF alone and ETN/EC in a sentence.
    if tag.startswith("N"):
        return "N"
    if tag[:2] in ("VV", "VA", "VX"):
        return "V"
    if tag.startswith("E"):
        return "E"
    return tag


def _key_sequences(keyword: str, predicate: bool) -> set[tuple[tuple[str, str], ...]]:
    """The keyword's own morpheme sequences (plain and split analyses); predicates lose their 다."""
    seqs = set()
    for toks in (*_analyse(keyword, False), *_analyse(keyword, True)):
        toks = [(f, _coarse(t)) for f, t, *_ in toks]
        if predicate:
            while toks and toks[-1][1] == "E":
                toks.pop()
        if toks:
            seqs.add(tuple(toks))
    return seqs


def _contains_seq(hay: Sequence[tuple[str, str]], needle: tuple[tuple[str, str], ...]) -> bool:
    n = len(needle)
    return any(tuple(hay[i : i + n]) == needle for i in range(len(hay) - n + 1))


def _word_index(text: str, toks: Sequence[Tok]) -> list[int]:
    """For each token, the index of the whitespace word its first character falls in."""
    spans, out, w = _words(text), [], 0
    for _, _, start, _ in toks:
        while w + 1 < len(spans) and start >= spans[w + 1][0]:
            w += 1
        out.append(w)
    return out


def _cuts_noun(form: str, tag: str) -> bool:
    # What ends a word's nominal part: particles, the copula, inflectional endings (a noun-forming ending
    # ETN like 기다리+ㅁ keeps it going), punctuation, and the plural suffix 들 (other noun suffixes such
    # as 쟁이 in 소금쟁이 make a new noun and stay).
    return (tag.startswith(("J", "S")) or tag == "VCP" or (_is_ending(tag) and tag != "ETN")
            or (tag == "XSN" and form == "들"))


def _nominal_parts(text: str, toks: Sequence[Tok]) -> list[str]:
    """Per word, the surface before its first particle/ending: 밤바다가 -> 밤바다, 기다림은 -> 기다림."""
    parts, by_word = [], {}
    for tok, w in zip(toks, _word_index(text, toks)):
        by_word.setdefault(w, []).append(tok)
    for word in by_word.values():
        i = 0
        while i < len(word) and word[i][1].startswith("S"):  # skip opening quotes/brackets
            i += 1
        if i == len(word):
            continue
        begin = end = word[i][2]
        for form, tag, start, length in word[i:]:
            if _cuts_noun(form, tag):
                end = start
                break
            end = start + length
        if end > begin:
            parts.append(text[begin:end])
    return parts


def _predicate_stems(text: str, toks: Sequence[Tok]) -> set[str]:
    """Lemma stems in the text, with any noun/root before a 하다-suffix: 사랑했다 -> {하, 사랑하}."""
    stems, words = set(), _word_index(text, toks)
    for j, (form, tag, _, _) in enumerate(toks):
        if not _is_pred_tag(tag):
            continue
        acc = form
        stems.add(acc)
        for k in range(j - 1, -1, -1):
            f, t, _, _ = toks[k]
            if words[k] != words[j] or not (t.startswith("N") or t in ("XR", "XPN") or _is_pred_tag(t)):
                break
            acc = f + acc
            stems.add(acc)
    return stems


def _morpheme_present(text: str, keyword: str, predicate: bool) -> bool:
    readings = (*_analyse(text, False), *_analyse(text, True))
    # 1) the keyword's own morpheme sequence occurs in the text (바다/N; 흔들리/V; 사랑/N 하/XSV).
    hays = [[(f, _coarse(t)) for f, t, *_ in toks] for toks in readings]
    if any(_contains_seq(h, seq) for seq in _key_sequences(keyword, predicate) for h in hays):
        return True
    if predicate:
        # 2) a lemma stem in the text equals the keyword's stem or ends with it (뒤흔들리 for 흔들리;
        #    only for stems of 2+ syllables, else 가다 would match every …가 verb).
        stem = _stem(keyword)
        return any(s == stem or (len(stem) >= 2 and s.endswith(stem))
                   for toks in readings for s in _predicate_stems(text, toks))
    # 3) nouns: a word's nominal part is the keyword, or a compound whose head (last part) is the keyword:
    #    밤바다 contains 바다, but 등대지기 (a keeper) does not contain 등대, nor 눈물 눈.
    return any(p == keyword or p.endswith(keyword) for toks in readings for p in _nominal_parts(text, toks))


# --------------------------------------------------------------------------------------------------
# Public API.


def keyword_present(text: str, keyword: str, *, level: str = "surface", kind: str | None = None) -> bool:
    """Whether ``keyword`` occurs in ``text`` at the given level ("surface" or "morpheme").

    ``kind`` ("concrete", "abstract", "noun", "verb", "adjective") says whether the keyword is a noun or a
    dictionary-form predicate; when omitted it is inferred (see :func:`is_predicate`).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    text, keyword = _nfc(text), _nfc(keyword.strip())
    if not keyword:
        raise ValueError("empty keyword")
    predicate = is_predicate(keyword, kind)
    if level == "surface":
        return any(form in text for form in surface_forms(keyword, "verb" if predicate else "noun"))
    return _morpheme_present(text, keyword, predicate)


def keyword_hits(
    text: str,
    keywords: Iterable[str],
    level: str = "surface",
    kinds: Iterable[str | None] | None = None,
) -> list[bool]:
    """Presence of each keyword, in order (coverage = mean of this list; all-present = all of it)."""
    keywords = list(keywords)
    kinds = [None] * len(keywords) if kinds is None else list(kinds)
    if len(kinds) != len(keywords):
        raise ValueError(f"{len(keywords)} keywords but {len(kinds)} kinds")
    return [keyword_present(text, k, level=level, kind=c) for k, c in zip(keywords, kinds)]
