"""The keyword-literature data set, and a loader for users' own SFT/DPO files.

Two entry points:

* :func:`load_examples` reads the shipped set: one source file, ``kwjax/data_files/keyword_literature.jsonl``
  (inside the package so that ``pip install`` carries it). 175 rows, each a prompt with three keywords,
  a chosen passage and a rejected one. The 140/35 train/validation split is a field of the file, so
  every script sees the same split. :func:`sft_view` and :func:`dpo_view` turn the same rows into the
  SFT (``input``/``output``) and DPO (``prompt``/``chosen``/``rejected``) shapes.
* :func:`load_records` reads a user's file (JSONL, JSON list, CSV, or a ``datasets`` directory written by
  ``save_to_disk``) into the same dict shapes. Rows may come in kwjax's own shape or in the formats TRL
  users bring (prompt/completion, conversational ``messages``, preference pairs with an explicit or
  implicit prompt, Alpaca, the shipped schema); docs/DATA_FORMATS.md lists them. Every row is
  validated; a bad row raises :class:`DataError` naming the file, the line or row, the field and what
  was expected. Nothing is dropped silently.

On top of both, :func:`split_rows` (training) and :func:`validation_rows` (evaluation) decide from a run's
config which of them a run uses, so that no two callers choose differently.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from kwjax.files import jsonl_objects
from kwjax.keywords import KINDS
from kwjax.prompt_keywords import keywords_from_prompt

__all__ = [
    "DataError",
    "Example",
    "SOURCE_PATH",
    "SPLITS",
    "FORMS",
    "FAILURE_MODES",
    "RECORD_FIELDS",
    "load_examples",
    "load_heldout",
    "sft_view",
    "dpo_view",
    "load_records",
    "shipped_or_file_rows",
    "split_rows",
    "preference_rows",
    "validation_rows",
]

log = logging.getLogger(__name__)

# The one source file of the shipped set (package data, see pyproject's [tool.setuptools.package-data]).
SOURCE_PATH = Path(__file__).resolve().parent / "data_files" / "keyword_literature.jsonl"

SPLITS = ("train", "validation")
FORMS = ("poem", "prose")
# How each rejected passage fails the task (see data/CARD.md).
FAILURE_MODES = ("missing_keyword", "keyword_list", "flat_prose", "repetition", "too_short", "off_topic")
# Text fields of the records load_records returns, per kind (kwjax's own row shapes too).
RECORD_FIELDS = {"sft": ("input", "output"), "dpo": ("prompt", "chosen", "rejected")}


class DataError(ValueError):
    """A data file or one of its rows is not what kwjax expects.

    ``path``, ``where`` (e.g. "line 3", "row 2", "index 4"; "" for the whole file) and ``field`` are kept as
    attributes so callers can collect and report errors themselves.
    """

    def __init__(self, path: str | Path, where: str, field: str | None, problem: str):
        self.path, self.where, self.field, self.problem = str(path), where, field, problem
        loc = f"{self.path}, {where}" if where else self.path
        if field:
            loc += f", field {field!r}"
        super().__init__(f"{loc}: {problem}")


# --------------------------------------------------------------------------------------------------
# Reading rows from the supported formats. Each reader yields (where, row) pairs.

_JSONL_EXT = (".jsonl", ".ndjson")
_SUPPORTED = "a .jsonl/.ndjson file, a .json list, a .csv file, or a datasets save_to_disk directory"


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"a string ({value[:30]!r})"
    if value is None:
        return "null"
    return f"{type(value).__name__} ({str(value)[:30]})"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(path, "", None, f"not UTF-8 text (byte {e.start}); save the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, row in jsonl_objects(_read_text(path), lambda n, e: DataError(
            path, f"line {n}", None, f"malformed JSON at column {e.colno}: {e.msg}")):
        yield f"line {lineno}", row


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", None, f"malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise DataError(path, "", None, f"expected a JSON list of objects, got {type(data).__name__} "
                        "(for one object per line, name the file .jsonl)")
    for i, row in enumerate(data, start=1):
        yield f"row {i}", row


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True), restkey=None, restval=None)
    header = reader.fieldnames or []
    if any(not (h or "").strip() for h in header):
        raise DataError(path, "line 1", None, f"header has an empty column name: {header}")
    for i, row in enumerate(reader, start=1):
        where = f"row {i} (line {reader.line_num})"
        if None in row:
            raise DataError(path, where, None, f"more cells than the header's {len(header)} columns")
        if any(v is None for v in row.values()):
            missing = [k for k, v in row.items() if v is None]
            raise DataError(path, where, missing[0], f"row has fewer cells than the header ({len(header)} columns)")
        yield where, row


def _iter_datasets(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(path, "", None, f"directory is not a datasets save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise DataError(path, "", None, f"is a DatasetDict with splits {sorted(ds)}; pass split=...")
        if split not in ds:
            raise DataError(path, "", None, f"has no split {split!r}; splits are {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"index {i}", row


def _iter_rows(path: Path, split: str | None = None) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        return _iter_datasets(path, split)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix in _JSONL_EXT:
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path)
    if suffix == ".csv":
        return _iter_csv(path)
    raise DataError(path, "", None, f"unknown file extension {path.suffix!r}; expected {_SUPPORTED}")


# --------------------------------------------------------------------------------------------------
# Field validation.


def _present(path: Path, where: str, row: dict, field: str, expected_fields: Sequence[str]) -> Any:
    if field not in row:
        have = sorted(k for k in row if isinstance(k, str))
        raise DataError(path, where, field, f"missing field (expected fields {list(expected_fields)}; row has {have})")
    return row[field]


def _text_field(path: Path, where: str, row: dict, field: str, expected_fields: Sequence[str]) -> str:
    value = _present(path, where, row, field, expected_fields)
    if not isinstance(value, str):
        raise DataError(path, where, field, f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise DataError(path, where, field, "expected a non-empty string, got an empty string")
    return value


def _keywords_field(path: Path, where: str, row: dict, *, from_csv: bool, required: bool) -> list[str] | None:
    value = row.get("keywords")
    if value is None or (from_csv and isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(path, where, "keywords", "missing field (expected a list of keyword strings)")
        return None
    if from_csv and isinstance(value, str):
        value = [k.strip() for k in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise DataError(path, where, "keywords", f"expected a list of strings, got {_describe(value)}")
    if not value:
        raise DataError(path, where, "keywords", "expected a non-empty list of strings, got an empty list")
    for j, k in enumerate(value):
        if not isinstance(k, str) or not k.strip():
            raise DataError(path, where, "keywords", f"expected a list of non-empty strings; item {j} is {_describe(k)}")
    return [k.strip() for k in value]


# --------------------------------------------------------------------------------------------------
# Chat messages (TRL's conversational formats). kwjax's chat format is one exchange, so a conversation
# must be [system,] user, assistant; the system message is folded into the user turn as Gemma's
# template does it (system text, a blank line, the user text).

_ROLES = ("system", "user", "assistant")
_SINGLE_TURN = "kwjax's chat format is single-turn: [system,] user, assistant"


def _messages(path: Path, where: str, field: str, value: Any) -> list[tuple[str, str]]:
    """(role, content) pairs of a message list, each message checked where a bad one would mislead."""
    if not isinstance(value, list):
        raise DataError(path, where, field, f"expected a list of messages ({{'role', 'content'}} objects), "
                        f"got {_describe(value)}")
    if not value:
        raise DataError(path, where, field, "expected a non-empty list of messages, got an empty list")
    out = []
    for i, msg in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(path, where, at,
                            f"expected a message object with 'role' and 'content', got {_describe(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(path, where, f"{at}.{key}", "missing field (a message needs 'role' and 'content')")
        role, content = msg["role"], msg["content"]
        if role not in _ROLES:
            raise DataError(path, where, f"{at}.role", f"expected one of {list(_ROLES)}, got {_describe(role)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(path, where, f"{at}.content", f"expected a non-empty string, got {_describe(content)}")
        out.append((role, content))
    return out


def _check_turns(path: Path, where: str, field: str, roles: list[str], *, reply: bool) -> None:
    """Raise unless ``roles`` are [system,] user (then assistant when ``reply``), naming the first misfit."""
    last = len(roles) - 1
    want_last = "assistant" if reply else "user"
    if roles[last] != want_last:
        what = "the assistant's response" if reply else "the user's message (the response has its own field)"
        raise DataError(path, where, f"{field}[{last}].role", f"the last message must be {what}, got {roles[last]!r}")
    users = [i for i, r in enumerate(roles) if r == "user"]
    if len(users) > 1:
        raise DataError(path, where, f"{field}[{users[1]}].role", f"a second user turn; {_SINGLE_TURN}")
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles):
        expected = "system" if i < start else "user" if i == start else "assistant"
        if role != expected or i > start + 1:
            problem = (f"expected {expected!r}, got {role!r}" if i <= start + 1 else f"one message too many ({role!r})")
            raise DataError(path, where, f"{field}[{i}].role", f"{problem}; {_SINGLE_TURN}")


def _user_text(system: str | None, user: str) -> str:
    """The user turn kwjax trains on; a system message goes first, then a blank line (Gemma's template)."""
    return user if system is None else f"{system}\n\n{user.strip()}"


def _chat_prompt(path: Path, where: str, field: str, msgs: list[tuple[str, str]]) -> str:
    """The prompt of a message list that ends with the user's message."""
    _check_turns(path, where, field, [r for r, _ in msgs], reply=False)
    return _user_text(msgs[0][1] if len(msgs) == 2 else None, msgs[-1][1])


def _chat_pair(path: Path, where: str, field: str, msgs: list[tuple[str, str]]) -> tuple[str, str]:
    """(prompt, response) of a whole single-turn conversation."""
    _check_turns(path, where, field, [r for r, _ in msgs], reply=True)
    return _user_text(msgs[0][1] if len(msgs) == 3 else None, msgs[-2][1]), msgs[-1][1]


# --------------------------------------------------------------------------------------------------
# Rows in each accepted format (docs/DATA_FORMATS.md), read into (prompt, response[, rejected]).

_SHIPPED_TEXT = ("instruction", "chosen", "rejected")


def _has(row: dict, field: str) -> bool:
    """Whether a row carries ``field``; a null counts as absent, as in a ``datasets`` table whose rows mix
    formats (every column exists in every row there)."""
    return row.get(field) is not None


def _prompt_field(path: Path, where: str, row: dict, field: str, expected_fields: Sequence[str]) -> str:
    """A prompt given as a string or as messages ending with the user's."""
    if isinstance(_present(path, where, row, field, expected_fields), list):
        return _chat_prompt(path, where, field, _messages(path, where, field, row[field]))
    return _text_field(path, where, row, field, expected_fields)


def _response_field(path: Path, where: str, row: dict, field: str, expected_fields: Sequence[str]) -> str:
    """A response given as a string or as a list holding the one assistant message."""
    if not isinstance(_present(path, where, row, field, expected_fields), list):
        return _text_field(path, where, row, field, expected_fields)
    msgs = _messages(path, where, field, row[field])
    if msgs[-1][0] != "assistant":
        raise DataError(path, where, f"{field}[{len(msgs) - 1}].role", f"expected 'assistant', got {msgs[-1][0]!r}")
    if len(msgs) > 1:
        raise DataError(path, where, field, f"expected one assistant message, got {len(msgs)} messages "
                        "(the prompt's messages go in 'prompt')")
    return msgs[0][1]


def _alpaca_pair(path: Path, where: str, row: dict) -> tuple[str, str]:
    """Alpaca: the prompt keeps the instruction and, when there is one, the input after a blank line."""
    fields = ("instruction", "input", "output")
    instruction = _text_field(path, where, row, "instruction", fields)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(path, where, "input", f"expected a string (may be empty), got {_describe(extra)}")
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra and extra.strip() else instruction
    return prompt, _text_field(path, where, row, "output", fields)


def _implicit_prompt(path: Path, where: str, row: dict) -> tuple[str, str, str]:
    """TRL's implicit prompt: chosen and rejected conversations share every message but their last."""
    fields = ("chosen", "rejected")
    chosen, rejected = (_messages(path, where, f, _present(path, where, row, f, fields)) for f in fields)
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1][0] != "assistant":
            raise DataError(path, where, f"{field}[{len(msgs) - 1}].role",
                            f"the last message must be the assistant's response, got {msgs[-1][0]!r}")
    if chosen[:-1] != rejected[:-1]:
        i = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise DataError(path, where, f"rejected[{i}]", f"differs from chosen[{i}] before the last (assistant) "
                        "message; without a 'prompt' field chosen and rejected must share their prompt messages")
    if len(chosen) == 1:
        raise DataError(path, where, "prompt", "missing field, and chosen and rejected share no prompt messages "
                        "(an implicit prompt is the messages they both start with)")
    return _chat_prompt(path, where, "chosen", chosen[:-1]), chosen[-1][1], rejected[-1][1]


def _sft_shape(row: dict) -> str | None:
    """The SFT format a row is in, if it is in one (for the error that says to load it with kind='sft')."""
    for fields in (("instruction", "output"), ("prompt", "completion"), ("messages",), ("input", "output")):
        if all(_has(row, f) for f in fields):
            return "/".join(fields)
    return None


def _dpo_triple(path: Path, where: str, row: dict) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a preference row: explicit prompt, the shipped schema, or implicit."""
    fields = RECORD_FIELDS["dpo"]
    if not _has(row, "chosen") and not _has(row, "rejected") and (shape := _sft_shape(row)):
        missing = next(f for f in fields if not _has(row, f))
        raise DataError(path, where, missing, f"missing field; the row is an SFT row ({shape}) with no "
                        "chosen/rejected pair: load it with kind='sft'")
    if not _has(row, "prompt") and _has(row, "instruction"):  # the shipped schema
        return tuple(_text_field(path, where, row, f, _SHIPPED_TEXT) for f in _SHIPPED_TEXT)
    if not _has(row, "prompt") and isinstance(row.get("chosen"), list):
        return _implicit_prompt(path, where, row)
    return (_prompt_field(path, where, row, "prompt", fields), _response_field(path, where, row, "chosen", fields),
            _response_field(path, where, row, "rejected", fields))


def _sft_pair(path: Path, where: str, row: dict) -> tuple[str, str]:
    """(input, output) of an SFT row; a preference row gives its prompt and chosen response, so one
    file serves both stages of SFT then DPO."""
    if _has(row, "messages"):
        return _chat_pair(path, where, "messages", _messages(path, where, "messages", row["messages"]))
    if _has(row, "instruction") and not _has(row, "output") and _has(row, "chosen"):  # the shipped schema
        return (_text_field(path, where, row, "instruction", _SHIPPED_TEXT),
                _text_field(path, where, row, "chosen", _SHIPPED_TEXT))
    if _has(row, "instruction"):
        return _alpaca_pair(path, where, row)
    if _has(row, "completion"):
        fields = ("prompt", "completion")
        return (_prompt_field(path, where, row, "prompt", fields),
                _response_field(path, where, row, "completion", fields))
    if _has(row, "chosen") or _has(row, "rejected"):
        prompt, chosen, _ = _dpo_triple(path, where, row)
        return prompt, chosen
    if _has(row, "text") and not _has(row, "input") and not _has(row, "output"):
        raise DataError(path, where, "text", "plain text rows (TRL's language-modeling format) have no prompt and "
                        "response; kwjax needs input/output, prompt/completion, messages or instruction/output")
    fields = RECORD_FIELDS["sft"]
    return _text_field(path, where, row, "input", fields), _text_field(path, where, row, "output", fields)


# --------------------------------------------------------------------------------------------------
# The loader.


def load_records(path: str | Path, kind: str = "sft", *, split: str | None = None,
                 keep: Sequence[str] = ()) -> list[dict]:
    """Read and validate a user's SFT or DPO file; returns one dict per row, in file order.

    Records come back as ``{"id", "input", "output", "keywords"}`` (``kind="sft"``) or ``{"id", "prompt",
    "chosen", "rejected", "keywords"}`` (``kind="dpo"``), whichever accepted format each row is in
    (detected per row from its fields; see docs/DATA_FORMATS.md): kwjax's own ``input``/``output`` and
    ``prompt``/``chosen``/``rejected`` strings, TRL's prompt/completion, ``messages`` and preference
    formats (explicit or implicit prompt), Alpaca, and the shipped schema. With ``kind="sft"`` a
    preference row gives its prompt and chosen response. ``id`` is the row's own string ``id`` if it has
    one, else ``"<file name>#<record number>"``. ``keywords`` is the row's list of strings (a
    comma-separated string in CSV); without one, the three keywords its prompt names
    (`kwjax.prompt_keywords`), else None, and one warning per file counts such rows. Other fields
    are ignored, ``split`` among them: the whole file is used, unless ``keep`` names fields to copy
    through (string values only; absent = not in the record). The ``split`` argument picks a split when
    the path is a saved ``DatasetDict``. Raises :class:`DataError` on the first bad row or an unusable file.
    """
    if kind not in RECORD_FIELDS:
        raise ValueError(f"kind must be one of {sorted(RECORD_FIELDS)}, got {kind!r}")
    path = Path(path)
    from_csv = path.suffix.lower() == ".csv" and not path.is_dir()
    records = []
    for where, row in _iter_rows(path, split):
        if not isinstance(row, dict):
            raise DataError(path, where, None, f"expected an object with fields {list(RECORD_FIELDS[kind])}, "
                            f"got {_describe(row)}")
        rid = row.get("id")
        rec: dict[str, Any] = {"id": rid if isinstance(rid, str) and rid.strip() else f"{path.name}#{len(records) + 1}"}
        texts = _sft_pair(path, where, row) if kind == "sft" else _dpo_triple(path, where, row)
        rec.update(zip(RECORD_FIELDS[kind], texts))
        keywords = _keywords_field(path, where, row, from_csv=from_csv, required=False)
        rec["keywords"] = keywords if keywords is not None else keywords_from_prompt(texts[0])
        for field in keep:
            if field in row and row[field] is not None:
                if not isinstance(row[field], str):
                    raise DataError(path, where, field, f"expected a string, got {_describe(row[field])}")
                rec[field] = row[field]
        records.append(rec)
    if not records:
        raise DataError(path, "", None, "empty file: no rows")
    _warn_missing_keywords(path, records)
    return records


def _warn_missing_keywords(path: Path, records: Sequence[dict]) -> None:
    """Rows without keywords drop out of keyword coverage; say so once per file rather than silently."""
    missing = [r["id"] for r in records if r["keywords"] is None]
    if missing:
        log.warning("%s: keyword coverage will be off for %d of %d rows (no 'keywords' field, and the prompt "
                    "names no three keywords kwjax can find; e.g. %s): add a 'keywords' list to them",
                    path, len(missing), len(records), ", ".join(missing[:3]))


# --------------------------------------------------------------------------------------------------
# The shipped keyword-literature set.


@dataclasses.dataclass(frozen=True)
class Example:
    """One row of the shipped set: a keyword prompt with a chosen and a rejected passage."""

    id: str                           # "kl-001" … "kl-175", stable across releases
    keywords: tuple[str, str, str]    # verbs/adjectives in dictionary form (흔들리다)
    keyword_kinds: tuple[str, str, str]  # each one of kwjax.keywords.KINDS
    instruction: str                  # the prompt; names the three keywords
    chosen: str                       # a literary passage containing all three keywords
    rejected: str                     # a passage that fails the task in the way failure_mode says
    failure_mode: str                 # one of FAILURE_MODES
    form: str                         # "poem" or "prose" (of the chosen passage)
    split: str                        # "train" or "validation", stored in the file, never recomputed


_EXAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Example))


def example_from_row(path: Path, where: str, row: Any) -> Example:
    if not isinstance(row, dict):
        raise DataError(path, where, None, f"expected an object, got {_describe(row)}")
    extra = sorted(set(row) - set(_EXAMPLE_FIELDS))
    if extra:
        raise DataError(path, where, extra[0], f"unknown field (fields are {list(_EXAMPLE_FIELDS)})")
    text = {f: _text_field(path, where, row, f, _EXAMPLE_FIELDS)
            for f in ("id", "instruction", "chosen", "rejected", "failure_mode", "form", "split")}
    for field, allowed in (("failure_mode", FAILURE_MODES), ("form", FORMS), ("split", SPLITS)):
        if text[field] not in allowed:
            raise DataError(path, where, field, f"expected one of {list(allowed)}, got {text[field]!r}")
    keywords = _keywords_field(path, where, row, from_csv=False, required=True)
    if len(keywords) != 3:
        raise DataError(path, where, "keywords", f"expected 3 keywords, got {len(keywords)}")
    kinds = row.get("keyword_kinds")
    if not isinstance(kinds, list) or len(kinds) != 3 or any(k not in KINDS for k in kinds):
        raise DataError(path, where, "keyword_kinds", f"expected a list of 3 items from {list(KINDS)}, got {_describe(kinds)}")
    return Example(keywords=tuple(keywords), keyword_kinds=tuple(kinds), **text)


HELDOUT_PATH = SOURCE_PATH.with_name("heldout_keywords.jsonl")


def load_heldout(path: str | Path | None = None) -> list[dict]:
    """The held-out-keyword prompts: 40 prompts none of whose keywords (nor a word containing or contained
    in one) occurs anywhere in the shipped set. Prompts only (no passages): they test whether a model
    uses keywords it never saw in training; `scripts/build_pairs.py` makes pairs for them by sampling.
    Rows: ``{"id", "prompt", "keywords", "keyword_kinds", "form", "split": "heldout"}``."""
    path = Path(path) if path else HELDOUT_PATH
    rows = []
    for lineno, raw in jsonl_objects(_read_text(path), lambda n, e: DataError(
            path, f"line {n}", None, f"is not valid JSON ({e.msg})")):
        for field in ("id", "instruction", "form"):
            if not isinstance(raw.get(field), str) or not raw[field].strip():
                raise DataError(path, f"line {lineno}", field, "expected a non-empty string")
        kws, kinds = raw.get("keywords"), raw.get("keyword_kinds")
        if not (isinstance(kws, list) and len(kws) == 3 and all(isinstance(k, str) and k for k in kws)):
            raise DataError(path, f"line {lineno}", "keywords", f"expected a list of 3 strings, got {kws!r}")
        if not (isinstance(kinds, list) and len(kinds) == 3 and all(k in KINDS for k in kinds)):
            raise DataError(path, f"line {lineno}", "keyword_kinds", f"expected 3 of {KINDS}, got {kinds!r}")
        rows.append({"id": raw["id"], "prompt": raw["instruction"], "keywords": kws, "keyword_kinds": kinds,
                     "form": raw["form"], "split": "heldout"})
    return rows


def load_examples(path: str | Path | None = None, split: str | None = None) -> list[Example]:
    """The shipped rows (or a file in the same schema), in file order; ``split`` keeps one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    path = SOURCE_PATH if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data set file not found: {path}")
    rows, seen = [], {}
    for where, row in _iter_jsonl(path):
        ex = example_from_row(path, where, row)
        if ex.id in seen:
            raise DataError(path, where, "id", f"duplicate id {ex.id!r} (first at {seen[ex.id]})")
        seen[ex.id] = where
        rows.append(ex)
    if not rows:
        raise DataError(path, "", None, "empty file: no rows")
    return [r for r in rows if split is None or r.split == split]


def sft_view(rows: Sequence[Example]) -> list[dict]:
    """SFT records: the instruction as ``input``, the chosen passage as ``output``."""
    return [{"id": r.id, "input": r.instruction, "output": r.chosen, "keywords": list(r.keywords)} for r in rows]


def dpo_view(rows: Sequence[Example]) -> list[dict]:
    """DPO records from the same rows: ``prompt``, ``chosen``, ``rejected``."""
    return [{"id": r.id, "prompt": r.instruction, "chosen": r.chosen, "rejected": r.rejected,
             "keywords": list(r.keywords)} for r in rows]


# --------------------------------------------------------------------------------------------------
# Which rows a run trains and validates on: decided here once, so training, the experiment and the
# evaluation script cannot disagree about what "validation" means.


def shipped_or_file_rows(path: str | Path | None, kind: str, split: str) -> list[dict]:
    """A user's file in the ``kind`` view when ``path`` is given, else that split of the shipped set."""
    if path:
        return load_records(path, kind)
    view = sft_view if kind == "sft" else dpo_view
    return view(load_examples(split=split))


def preference_rows(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train, validation) DPO records of a preference file by its rows' ``split`` field: "train" or no
    split trains, "validation" validates, any other split (the builder's "heldout") is never trained on."""
    train, evals = [], []
    for rec in load_records(path, "dpo", keep=("split",)):
        split = rec.pop("split", "train")
        (train if split == "train" else evals if split == "validation" else []).append(rec)
    if not train:
        raise DataError(Path(path), "", "split", "no training rows (split 'train' or none)")
    return train, evals


def split_rows(config, kind: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) for training: ``config.data.train_file`` (and ``eval_file``), else the
    shipped split; each cut to ``data.train_limit`` / ``data.eval_limit`` when set. DPO stages take
    ``data.preference_file`` instead when it is set (:func:`preference_rows`), so SFT→DPO can train its
    SFT stage on the authored passages and its DPO stage on on-policy pairs.

    A train file without an eval file means no eval rows: the shipped validation pairs are another
    data set than the user's. Without a train file both come from the shipped split, even when
    ``eval_file`` is set (evaluation, `validation_rows`, does read it then).
    """
    d = config.data
    if kind == "dpo" and d.get("preference_file", ""):
        train, evals = preference_rows(d.preference_file)
    elif d.train_file:
        train = load_records(d.train_file, kind)
        evals = load_records(d.eval_file, kind) if d.eval_file else []
    else:
        train, evals = shipped_or_file_rows(None, kind, "train"), shipped_or_file_rows(None, kind, "validation")
    if d.get("train_limit", 0):
        train = train[:d.train_limit]
    if d.get("eval_limit", 0):
        evals = evals[:d.eval_limit]
    return train, evals


def validation_rows(config, kind: str = "dpo", limit: int = 0) -> list[dict]:
    """The rows a finished model is evaluated on: ``config.data.eval_file``, else the shipped validation
    split; the first ``limit`` when ``limit`` is set."""
    rows = shipped_or_file_rows(config.data.eval_file, kind, "validation")
    return rows[:limit] if limit else rows
