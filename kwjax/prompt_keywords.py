"""The keywords a prompt names, for data files without a `keywords` field.

Evaluation measures keyword coverage against each row's keywords; a user's file often has none, so
they are read from the prompt. Conservative by design: exactly three keywords, or nothing (a miss is
reported by `kwjax.data.load_records`; a wrong guess would not be).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["keywords_from_prompt"]


_SYL = "\uac00-\ud7a3"  # precomposed Hangul syllables
_HANGUL_WORD = re.compile(f"[{_SYL}]+")
_QUOTED = re.compile(r"'([^'\n]+)'|\"([^\"\n]+)\"|‘([^’\n]+)’|“([^”\n]+)”|「([^」\n]+)」|『([^』\n]+)』|\[([^\]\n]+)\]")
_QUOTE_CHARS = re.compile(r"['\"‘’“”「」『』\[\]]")
_DESCRIPTOR = re.compile(r"(?:형용사|동사|명사|단어|낱말)\s+(?=['\"‘“「『])")  # 그리고 형용사 '쓸쓸하다'
_BREAK = re.compile(r"[\n.!?~:;()—–→\u3131-\u318e]|\s-\s")  # sentence ends, colons, dashes, ㅋㅋ
_SEP_CLASSES = (",", "/", "·・")
_NUMBERED = re.compile(rf"^\s*\d+[.)]\s*([{_SYL}]+)\s*$", re.M)  # 1. 눈꽃 \n 2. 체온계 \n 3. 침묵
# Three bare words opening a line, then the line's end, a dash, ㅋㅋ, or 이/위 (세) 단어…: 닻 커피 외로움\n…
_BARE = re.compile(rf"^\s*([{_SYL}]+) ([{_SYL}]+) ([{_SYL}]+)\s*(?:$|[—–\u3131-\u318e]|[이위] (?:단어|낱말|키워드|세|셋))",
                   re.M)
# Particles on the last listed keyword, each with what must end the syllable before it: C a final
# consonant (a final ㄹ counts), L a final ㄹ or a verb's 다 (이별로, 기다리다로; other vowels + 로 are
# left alone, as 피로 and 위로 are words), V no final consonant, * either.
_ENDINGS = (("이라는", "C"), ("라는", "V"), ("이에요", "C"), ("예요", "V"), ("입니다", "*"), ("이야", "C"),
            ("으로", "C"), ("로", "L"), ("을", "C"), ("를", "V"), ("은", "C"), ("는", "V"))
# The subject particles 이/가 only before a verb of appearing (그리움이 들어간), else 고양이 -> 고양, 휴가 -> 휴.
_SUBJECT = (("이", "C"), ("가", "V"))
_APPEARS = re.compile("들어|나오|나온|등장|포함|있|빠짐|꼭|다$|모두$")
_CONNECTIVES = (("이랑", "C"), ("랑", "V"), ("과", "C"), ("와", "V"))  # A와 B, A랑 B


def _final(syllable: str) -> str:
    """How a Hangul syllable ends: "C" (a final consonant), "L" (a final ㄹ) or "V" (none)."""
    i = ord(syllable) - 0xAC00
    if not 0 <= i <= 11171 or i % 28 == 0:
        return "V"
    return "L" if i % 28 == 8 else "C"


def _strip_ending(word: str, endings: Sequence[tuple[str, str]]) -> str:
    """``word`` without the first of ``endings`` that Korean phonology allows there, else unchanged."""
    for ending, before in endings:
        stem = word[: -len(ending)]
        if stem and word.endswith(ending):
            end = _final(stem[-1])
            if before in ("*", end) or (before == "C" and end == "L") or (before == "L" and stem[-1] == "다"):
                return stem
    return word


def _last_item(word: str, following: str) -> str:
    """The last listed keyword without its particle."""
    stem = _strip_ending(word, _ENDINGS)
    return _strip_ending(stem, _SUBJECT) if stem == word and _APPEARS.match(following) else stem


_OBJECT = (("을", "C"), ("를", "V"))
_REQUEST = re.compile("(?:줘|줄래|주세요|세요|봐|해|써|좀)$")


def _is_request_word(word: str) -> bool:
    """A word of a request, not a keyword: 시를 써 줘 is three bare words but names no keywords."""
    return bool(_REQUEST.search(word)) or _strip_ending(word, _OBJECT) != word


def _tokens(segment: str, seps: str) -> list[str]:
    """Words and separators; "A와 B" reads as "A, B" when B looks listed (a separator or particle follows),
    "A, B 그리고 C" and "A, B, 그리고 C" as "A, B, C"."""
    toks = re.findall(rf"[{re.escape(seps)}]|[^\s{re.escape(seps)}]+", segment)
    out: list[str] = []
    for i, tok in enumerate(toks):
        if tok == "그리고":
            out += [] if out and out[-1] in seps else [seps[0]]
            continue
        stem = _strip_ending(tok, _CONNECTIVES)
        nxt, after = (toks[i + 1 : i + 3] + [None, None])[:2]
        listed_next = nxt is not None and nxt not in seps and (
            after is None or after in seps or _strip_ending(nxt, _ENDINGS + _SUBJECT + _CONNECTIVES) != nxt)
        out += [stem, seps[0]] if stem != tok and listed_next else [tok]
    return out


def _lists(segment: str, seps: str) -> list[tuple[list[str], str]]:
    """Each run "w SEP w SEP w…" of single words in a segment, with the word that follows it ("" at the end)."""
    toks, found, i = _tokens(segment, seps), [], 0
    while i < len(toks):
        if toks[i] in seps or i + 1 >= len(toks) or toks[i + 1] not in seps:
            i += 1
            continue
        run, j = [toks[i]], i + 1
        while j < len(toks) and toks[j] in seps:
            j += 1
            if j >= len(toks) or toks[j] in seps:
                break
            run.append(toks[j])
            j += 1
        found.append((run, toks[j] if j < len(toks) else ""))
        i = j
    return found


def keywords_from_prompt(prompt: str) -> list[str] | None:
    """The three keywords a prompt names, in prompt order; None unless exactly one triple is found.

    Written for prompts like the shipped ones: quoted words ('항구', '우체통', '그리움'이 …), lists
    (A, B, C를 … / A·B·C / A / B / C / A와 B, 그리고 C), numbered lines, three bare words opening a line.
    Particles come off the last listed word only (그리움이 -> 그리움), and only Hangul words count, so a
    wrong guess is rarer than a miss: a miss is reported (see :func:`load_records`), a wrong guess is not.
    """
    quoted = [next(g for g in m.groups() if g) for m in _QUOTED.finditer(prompt)]
    items = [w.strip() for q in quoted for w in re.split(r"[,/·・]", q) if w.strip()]
    if len(items) == 3 and all(_HANGUL_WORD.fullmatch(w) for w in items):
        return items
    text = _QUOTE_CHARS.sub("", _DESCRIPTOR.sub("", prompt))
    found = [run[:-1] + [_last_item(run[-1], nxt)] for segment in _BREAK.split(text) for seps in _SEP_CLASSES
             for run, nxt in _lists(segment, seps) if len(run) == 3]
    numbered = _NUMBERED.findall(prompt)
    if len(numbered) == 3:
        found.append(numbered)
    if not found:
        found = [list(m) for m in _BARE.findall(prompt) if not any(map(_is_request_word, m))]
    unique = {tuple(c) for c in found if len(set(c)) == 3 and all(_HANGUL_WORD.fullmatch(w) for w in c)}
    if len(unique) != 1 or not set(items) <= set(next(iter(unique))):
        return None
    return list(next(iter(unique)))
