"""Build on-policy DPO pairs: sample a model on every prompt, score each output, pair a pass with a fail.

  python scripts/build_pairs.py --model=RUN/seed_0/train/sft/model --out_dir=/work/runs/pairs
  python scripts/build_pairs.py --model=gemma3-270m --out_dir=/tmp/p --limit=4 --samples=1   # smoke

Prompts: the shipped set (its train and validation splits, authored chosen passages as the fallback) and
the shipped held-out-keyword prompts (no authored passage), or ``--prompts_file`` (any file
`kwjax.data.load_records` reads as SFT rows; its outputs serve as the authored fallback). Writes
``candidates.jsonl`` (every output with its scores; a rerun resumes it), ``pairs.jsonl`` (one pair per
prompt with provenance; `data.preference_file` reads it), ``summary.json`` and the pairs' shortcut audit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kwjax import data, pairs, shortcuts  # noqa: E402
from kwjax.files import atomic_write_text  # noqa: E402


def prompt_rows(args) -> tuple[list[dict], dict[str, str]]:
    """(rows to sample for, authored chosen passage by id)."""
    if args.prompts_file:
        recs = data.load_records(args.prompts_file, "sft")
        rows = [{"id": r["id"], "prompt": r["input"], "keywords": r["keywords"], "split": "train"} for r in recs]
        missing = [r["id"] for r in rows if not r["keywords"]]
        if missing:
            raise data.DataError(Path(args.prompts_file), missing[0], "keywords",
                                 "needed to score outputs: add a 'keywords' list or name three in the prompt")
        return rows[:args.limit or None], {r["id"]: r["output"] for r in recs}
    splits = args.splits.split(",")
    unknown = [s for s in splits if s not in ("train", "validation", "heldout")]
    if unknown:
        raise SystemExit(f"error: --splits: unknown {unknown}; expected some of train, validation, heldout")
    rows, authored = [], {}
    for s in splits:
        part = data.load_heldout() if s == "heldout" else [
            {"id": e.id, "prompt": e.instruction, "keywords": list(e.keywords),
             "keyword_kinds": list(e.keyword_kinds), "split": e.split, "chosen": e.chosen}
            for e in data.load_examples(split=s)]
        rows += part[:args.limit or None]
    authored = {r["id"]: r["chosen"] for r in rows if r.get("chosen")}
    return rows, authored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model to sample: a trained run's model/ dir, gemma3-270m, ...")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--splits", default="train,validation,heldout", help="of the shipped prompts")
    p.add_argument("--prompts_file", help="sample for this file's prompts instead of the shipped ones")
    p.add_argument("--limit", type=int, default=0, help="> 0: the first N prompts of each split (smoke runs)")
    p.add_argument("--samples", type=int, default=2, help="seeded samples per prompt besides the greedy one")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_seq_rep_4", type=float, default=pairs.PairRules.max_seq_rep_4)
    p.add_argument("--min_chars", type=int, default=pairs.PairRules.min_chars)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    import kwjax
    from kwjax.sampling import SamplingError
    from kwjax.weights import WeightsError

    plan = pairs.SamplingPlan(model=str(args.model), samples=args.samples, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              batch_size=args.batch_size)
    rules = pairs.PairRules(max_seq_rep_4=args.max_seq_rep_4, min_chars=args.min_chars)
    candidates_path = args.out_dir / "candidates.jsonl"
    try:
        rows, authored = prompt_rows(args)
        model = kwjax.load(args.model, dtype=args.dtype)
        cands = pairs.sample_candidates(model, rows, plan, candidates_path, rules=rules)
    except (data.DataError, pairs.PairsError, SamplingError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    built, summary = pairs.build_pairs(cands, authored, plan, rules, seed=args.seed)
    if not built:
        print(f"error: no pairs: {summary['skipped']}", file=sys.stderr)
        return 1
    pairs.write_pairs(args.out_dir / "pairs.jsonl", built)
    summary["candidates_pass_rate"] = pairs.pass_rates(cands, rules)
    summary["shortcut_audit"] = {split: dataclasses.asdict(shortcuts.audit(shortcuts.pairs_of(ps)).best)
                                 for split, ps in _by_split(built).items()}
    atomic_write_text(args.out_dir / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped_ids"}, ensure_ascii=False, indent=1))
    print(f"wrote {len(built)} pairs to {args.out_dir / 'pairs.jsonl'}")
    return 0


def _by_split(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"all": list(rows)}
    for r in rows:
        out.setdefault(r["split"] or "unsplit", []).append(r)
    return out


if __name__ == "__main__":
    sys.exit(main())
