"""The write-up's claims judged across experiments that ran apart (another session, another machine).

  python scripts/combine_reports.py docs/recipe-270m/dpo_base_5ep/summary.json \\
      docs/recipe-270m/sft_dpo_onpolicy_5ep/summary.json --out=docs/recipe-270m/claims_combined.md

Each argument is an experiment report's ``summary.json``. A model that appears in several (the base model,
evaluated by every experiment) is taken from the first file given; the output names each model's source.
The claims are judged by the same rules as a single experiment's report (``kwjax.report.judge_claims``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kwjax import report  # noqa: E402
from kwjax.files import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", type=Path, help="experiment reports' summary.json files")
    p.add_argument("--out", type=Path, required=True, help="the combined report (markdown); JSON beside it")
    p.add_argument("--sampling", default="temperature 1.0, top-p 0.95", help="how the samples were drawn")
    args = p.parse_args(argv)
    loaded = []
    for path in args.summaries:
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {path}: cannot read it as JSON ({e})", file=sys.stderr)
            return 2
        if not isinstance(content, dict) or not isinstance(content.get("summary"), dict):
            print(f"error: {path}: expected an experiment report's summary.json (an object with 'summary')",
                  file=sys.stderr)
            return 2
        loaded.append((str(path), content))
    summary, source = report.merge(loaded)
    claims = report.judge_claims(summary)
    lines = ["# The write-up's claims across experiments", "", "Each model's numbers come from:", ""]
    lines += [f"- {report.LABELS[m]}: `{source[m]}`" for m in source]
    lines += [""] + report.comparison_lines(summary, claims, args.sampling, one_sample=False)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(
        {"sources": source, "claims": [dataclasses.asdict(c) for c in claims]}, indent=2, ensure_ascii=False))
    for c in claims:
        print(f"{c.verdict:>14}  {c.claim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
