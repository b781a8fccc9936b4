"""Has a model learned where a passage ends? Teacher-forced p(<end_of_turn>) on the validation passages.

  python scripts/diagnose_stop.py --model=runs/recipe/seed_0/train/sft/model [--model=gemma3-270m ...]

For each model: the median p(<end_of_turn>) at the position that ends each reference passage, how often
it is the model's first choice there, and the median at the passages' inner line ends (where the
reference goes on). A model that scores high at the end but never stops when decoding greedily has
learned the format and loops before reaching an end; one that scores low has not learned it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="a kwjax.load source; repeat for several")
    p.add_argument("--data", default="", help="a DPO file (prompt/chosen/rejected); default the shipped validation split")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the per-row scores and summaries as JSON here")
    args = p.parse_args(argv)

    import dataclasses

    import kwjax
    from kwjax import data, diagnose
    from kwjax.weights import WeightsError

    try:
        rows = data.shipped_or_file_rows(args.data or None, "dpo", "validation")
    except (data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = rows[:args.limit] if args.limit else rows
    results = {}
    for source in args.model:
        try:
            model = kwjax.load(source)
        except (WeightsError, FileNotFoundError, ValueError) as e:
            print(f"error: --model={source}: {e}", file=sys.stderr)
            return 2
        scores = diagnose.stop_scores(model, rows)
        results[source] = {"summary": diagnose.summary(scores), "rows": [dataclasses.asdict(s) for s in scores]}
        print(json.dumps({"model": source, **results[source]["summary"]}, ensure_ascii=False), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
