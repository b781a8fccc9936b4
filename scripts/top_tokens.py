"""Print the most likely next tokens for a prompt: a quick look inside any model source."""

from __future__ import annotations

import argparse

import numpy as np

import kwjax
from kwjax.models.gemma3.chat import format_user_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=kwjax.weights.EMBEDDED)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat format")
    args = parser.parse_args()
    if not args.prompt:
        parser.error("--prompt must not be empty")

    model = kwjax.load(args.model, dtype=args.dtype)
    text = format_user_prompt(args.prompt) if args.chat else args.prompt
    ids = model.tokenizer.encode(text, add_bos=True)
    logits = model.logits(np.asarray(ids)[None])[0, -1]
    logp = logits - np.logaddexp.reduce(logits)
    print(f"{'rank':>4}  {'id':>7}  {'logprob':>8}  token")
    for rank, i in enumerate(np.argsort(-logits)[:args.k], 1):
        print(f"{rank:>4}  {i:>7}  {logp[i]:>8.3f}  {model.tokenizer.decode([int(i)])!r}")


if __name__ == "__main__":
    main()
