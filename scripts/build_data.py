"""One-off: merge the five authored part files into the shipped keyword-literature source file.

Provenance, kept in the repository so it stays visible. The data set was authored in five parts of 35 rows
(data/parts/part1.jsonl … part5.jsonl, one writer each). This script

1. reads them in order (part 1 line 1 … part 5 line 35) and checks every row against the schema,
2. gives ids kl-001 … kl-175 in that order,
3. draws the 140/35 train/validation split with a fixed seed, stratified by failure mode and, within a
   failure mode, by form (poem/prose), and stores it as a "split" field,
4. writes kwjax/data_files/keyword_literature.jsonl.

After that merge the committed JSONL is the source of truth: later corrections were made in it directly
(see data/CARD.md), and the part files were removed. Rerunning this script would discard those
corrections, so it refuses to overwrite the source file without --force, and it fails clearly when the
part files are absent.

    python scripts/build_data.py            # needs data/parts/part{1..5}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kwjax.data import FAILURE_MODES, FORMS, SOURCE_PATH, example_from_row  # noqa: E402

PARTS_DIR = REPO / "data" / "parts"
N_PARTS, ROWS_PER_PART = 5, 35
N_VALIDATION = 35
SEED = 20250707
FIELD_ORDER = ("id", "split", "keywords", "keyword_kinds", "form", "failure_mode", "instruction", "chosen", "rejected")


def read_parts(parts_dir: Path) -> list[dict]:
    rows = []
    for p in range(1, N_PARTS + 1):
        path = parts_dir / f"part{p}.jsonl"
        if not path.exists():
            sys.exit(f"error: {path} is missing. The part files were merged once into {SOURCE_PATH} and then "
                     "removed; that file is now the source of truth, edit it directly.")
        lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        if len(lines) != ROWS_PER_PART:
            sys.exit(f"error: {path} has {len(lines)} rows, expected {ROWS_PER_PART}")
        for lineno, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path} line {lineno}: malformed JSON: {e}")
            rows.append((path, lineno, row))
    merged = []
    for i, (path, lineno, row) in enumerate(rows, start=1):
        row = {"id": f"kl-{i:03d}", "split": "train", **row}
        example_from_row(path, f"line {lineno}", row)  # schema check; raises DataError naming file/line/field
        merged.append(row)
    return merged


def largest_remainder(shares: dict, total: int) -> dict:
    """Integer quotas proportional to ``shares`` that sum to ``total`` (ties go to the earlier key)."""
    whole = sum(shares.values())
    exact = {k: v * total / whole if whole else 0 for k, v in shares.items()}
    quota = {k: int(x) for k, x in exact.items()}
    keys = list(shares)
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), keys.index(k)))[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def assign_split(rows: list[dict], n_validation: int, seed: int) -> None:
    """Seeded and stratified: each failure mode keeps its share of validation rows, and within a failure
    mode poems and prose keep theirs (largest-remainder rounding, so the total is exactly n_validation)."""
    rng = random.Random(seed)
    per_mode = largest_remainder({m: sum(r["failure_mode"] == m for r in rows) for m in FAILURE_MODES}, n_validation)
    for m in FAILURE_MODES:
        cells = {f: [r["id"] for r in rows if r["failure_mode"] == m and r["form"] == f] for f in FORMS}
        per_form = largest_remainder({f: len(ids) for f, ids in cells.items()}, per_mode[m])
        for f, ids in cells.items():
            rng.shuffle(ids)
            chosen = set(ids[: per_form[f]])
            for r in rows:
                if r["id"] in cells[f]:
                    r["split"] = "validation" if r["id"] in chosen else "train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=Path, default=PARTS_DIR)
    ap.add_argument("--out", type=Path, default=SOURCE_PATH)
    ap.add_argument("--force", action="store_true", help="overwrite an existing source file")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        sys.exit(f"error: {args.out} exists and is the source of truth; pass --force to rebuild it from parts")
    rows = read_parts(args.parts)
    assign_split(rows, N_VALIDATION, SEED)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in FIELD_ORDER}, ensure_ascii=False) + "\n")
    n_val = sum(r["split"] == "validation" for r in rows)
    print(f"wrote {len(rows)} rows ({len(rows) - n_val} train / {n_val} validation) to {args.out}")


if __name__ == "__main__":
    main()
