"""The keyword-literature data set, and a loader for users' own SFT/DPO files.

Two entry points:

* :func:`load_examples` reads the shipped set: one source file, ``kwjax/data_files/keyword_literature.jsonl``
  (inside the package so that ``pip install`` carries it). 175 rows, each a prompt with three keywords,
  a chosen passage and a rejected one. The 140/35 train/validation split is a field of the file, so
  every script sees the same split. :func:`sft_view` and :func:`dpo_view` turn the same rows into the
  SFT (``input``/``output``) and DPO (``prompt``/``chosen``/``rejected``) shapes.
* :func:`load_records` reads a user's file (JSONL, JSON list, CSV, or a ``datasets`` directory written by
  ``save_to_disk``) into the same dict shapes. Every row is validated; a bad row raises
  :class:`DataError` naming the file, the line or row, the field and what was expected. Nothing is
  dropped silently.

On top of both, :func:`split_rows` (training) and :func:`validation_rows` (evaluation) decide from a run's
config which of them a run uses, so that no two callers choose differently.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from kwjax.keywords import KINDS

__all__ = [
    "DataError",
    "Example",
    "SOURCE_PATH",
    "SPLITS",
    "FORMS",
    "FAILURE_MODES",
    "RECORD_FIELDS",
    "load_examples",
    "sft_view",
    "dpo_view",
    "load_records",
    "shipped_or_file_rows",
    "split_rows",
    "validation_rows",
]

# The one source file of the shipped set (package data, see pyproject's [tool.setuptools.package-data]).
SOURCE_PATH = Path(__file__).resolve().parent / "data_files" / "keyword_literature.jsonl"

SPLITS = ("train", "validation")
FORMS = ("poem", "prose")
# How each rejected passage fails the task (see data/CARD.md).
FAILURE_MODES = ("missing_keyword", "keyword_list", "flat_prose", "repetition", "too_short", "off_topic")
# Required text fields of a user record, per kind.
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
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue  # a blank line is not a row (e.g. a trailing newline)
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {lineno}", None, f"malformed JSON at column {e.colno}: {e.msg}") from None


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


def _text_field(path: Path, where: str, row: dict, field: str, expected_fields: Sequence[str]) -> str:
    if field not in row:
        have = sorted(k for k in row if isinstance(k, str))
        raise DataError(path, where, field, f"missing field (expected fields {list(expected_fields)}; row has {have})")
    value = row[field]
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


def load_records(path: str | Path, kind: str = "sft", *, split: str | None = None) -> list[dict]:
    """Read and validate a user's SFT or DPO file; returns one dict per row, in file order.

    ``kind="sft"`` rows need ``input`` and ``output``; ``kind="dpo"`` rows need ``prompt``, ``chosen`` and
    ``rejected``. Each must be a non-empty string. ``keywords`` is optional: a list of strings (a
    comma-separated string in CSV); it lets evaluation measure coverage without parsing the prompt.
    Records come back as ``{"id", <text fields>, "keywords"}`` (``keywords`` None when absent; ``id`` the
    row's own string ``id`` if it has one, else ``"<file name>#<record number>"``). Other fields are ignored.
    ``split`` picks a split when the path is a saved ``DatasetDict``.
    Raises :class:`DataError` on the first bad row or an unusable file.
    """
    if kind not in RECORD_FIELDS:
        raise ValueError(f"kind must be one of {sorted(RECORD_FIELDS)}, got {kind!r}")
    path = Path(path)
    fields = RECORD_FIELDS[kind]
    from_csv = path.suffix.lower() == ".csv" and not path.is_dir()
    records = []
    for where, row in _iter_rows(path, split):
        if not isinstance(row, dict):
            raise DataError(path, where, None, f"expected an object with fields {list(fields)}, got {_describe(row)}")
        other = "dpo" if kind == "sft" else "sft"
        if not any(f in row for f in fields) and all(f in row for f in RECORD_FIELDS[other]):
            raise DataError(path, where, fields[0], f"missing field; the row has {other} fields "
                            f"{list(RECORD_FIELDS[other])}: load it with kind={other!r}")
        rec: dict[str, Any] = {}
        rid = row.get("id")
        rec["id"] = rid if isinstance(rid, str) and rid.strip() else f"{path.name}#{len(records) + 1}"
        for f in fields:
            rec[f] = _text_field(path, where, row, f, fields)
        rec["keywords"] = _keywords_field(path, where, row, from_csv=from_csv, required=False)
        records.append(rec)
    if not records:
        raise DataError(path, "", None, "empty file: no rows")
    return records


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


def split_rows(config, kind: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) for training: ``config.data.train_file`` (and ``eval_file``), else the
    shipped split; each cut to ``data.train_limit`` / ``data.eval_limit`` when set.

    A train file without an eval file means no eval rows: the shipped validation pairs are another
    data set than the user's. Without a train file both come from the shipped split, even when
    ``eval_file`` is set (evaluation, `validation_rows`, does read it then).
    """
    d = config.data
    if d.train_file:
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
