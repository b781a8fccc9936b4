"""Preference accuracy of a trained model on any pairs: per token (no reference) and as DPO's reward.

  python scripts/pair_accuracy.py --model=RUN/train/sft_dpo/model --reference=RUN/train/sft/model \\
      --pairs=kwjax/data_files/keyword_literature_onpolicy.jsonl --split=heldout --output=acc.json

The training logs report DPO's reward accuracy on its own validation pairs only; this measures it on
other pairs (held-out keywords, the other pair set) after training. ``--reference`` is the model DPO
started from (its reference); without it only the per-token accuracy is computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kwjax import data, evaluate, metrics  # noqa: E402
from kwjax.files import atomic_write_text  # noqa: E402


def _ci(values) -> dict:
    mean, low, high = metrics.bootstrap_ci(values)
    return {"mean": mean, "ci95": [low, high]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--reference", help="the model DPO started from; gives the reward accuracy")
    p.add_argument("--pairs", required=True, help="any preference file kwjax.data.load_records reads")
    p.add_argument("--split", default="", help="keep the rows whose 'split' field is this (empty: all rows)")
    p.add_argument("--output", type=Path)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=512)
    args = p.parse_args(argv)

    import kwjax
    from kwjax.weights import WeightsError

    try:
        rows = data.load_records(args.pairs, "dpo", keep=("split",))
        if args.split:
            rows = [r for r in rows if r.get("split") == args.split]
            if not rows:
                raise data.DataError(Path(args.pairs), "", "split", f"no rows with split {args.split!r}")
        settings = evaluate.EvalSettings(batch_size=args.batch_size, max_length=args.max_length)
        lik = {}
        for name, source in (("policy", args.model), ("reference", args.reference)):
            if source:
                lik[name] = evaluate.pair_likelihoods(kwjax.load(source), rows, settings)
    except (data.DataError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pol = lik["policy"]
    out = {"model": args.model, "reference": args.reference, "pairs": args.pairs, "split": args.split,
           "n": len(pol),
           "per_token_preference_accuracy": _ci(metrics.preference_wins(
               [x.chosen_logp for x in pol], [x.chosen_tokens for x in pol],
               [x.rejected_logp for x in pol], [x.rejected_tokens for x in pol]))}
    if "reference" in lik:
        ref = lik["reference"]
        out["reward_accuracy"] = _ci(metrics.reward_wins([x.chosen_logp for x in pol], [x.rejected_logp for x in pol],
                                                         [x.chosen_logp for x in ref], [x.rejected_logp for x in ref]))
        margins = [(a.chosen_logp - b.chosen_logp) - (a.rejected_logp - b.rejected_logp) for a, b in zip(pol, ref)]
        out["log_ratio_margin"] = _ci(margins)  # × β = DPO's rewards/margins
    text = json.dumps(out, indent=1)
    if args.output:
        atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
