"""Evaluate one model on the keyword task: generations and metrics with bootstrap intervals.

  python scripts/evaluate.py --model=runs/dpo/model --output=evals/dpo
  python scripts/evaluate.py --model=gemma3-270m --keywords_file=my_keywords.jsonl --output=evals/base
  python scripts/evaluate.py --model=runs/sft/model --heldout --num_samples=1 --output=evals/sft-heldout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kwjax
import kwjax.data
from kwjax import evaluate
from kwjax.data import DataError
from kwjax.sampling import SamplingError
from kwjax.weights import WeightsError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=kwjax.weights.EMBEDDED)
    p.add_argument("--output", type=Path, required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="DPO-shaped file (prompt, chosen, rejected, keywords); default: shipped validation split")
    src.add_argument("--keywords_file", help="JSONL with a 'keywords' list per line (prompts built from them)")
    src.add_argument("--heldout", action="store_true",
                     help="the shipped held-out-keyword prompts (keywords the training data never has)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=36,
                   help="prompts decoded together (36, as the experiment: each decode step reads every weight "
                        "once, so one batch of 35 prompts costs far less than five of 8)")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    from kwjax.compiles import use_disk_cache

    use_disk_cache()
    try:
        if args.keywords_file:
            rows = evaluate.rows_from_keywords_file(args.keywords_file)
        elif args.heldout:
            rows = kwjax.data.load_heldout()
        else:
            rows = kwjax.data.shipped_or_file_rows(args.data, "dpo", "validation")
        if args.limit:
            rows = rows[:args.limit]
        settings = evaluate.EvalSettings(args.max_new_tokens, args.num_samples, args.temperature, args.top_p,
                                         args.seed, args.batch_size)
        model = kwjax.load(args.model, dtype=args.dtype)
        result = evaluate.evaluate(model, rows, settings, args.output)
    except (DataError, SamplingError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2, ensure_ascii=False)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
