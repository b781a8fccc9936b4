"""Generate from any model source: one prompt to stdout, or a JSONL file of prompts to a JSONL file.

  python scripts/sample.py --model=gemma3-270m --prompt="바다를 주제로 시를 써 줘" --chat --greedy
  python scripts/sample.py --prompts_file=prompts.jsonl --output=out.jsonl --temperature=0.8 --top_p=0.95
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kwjax
from kwjax.files import jsonl_objects
from kwjax.sampling import Sampler, SamplingConfig, SamplingError
from kwjax.weights import WeightsError


def read_prompts(path: Path) -> list[str]:
    """Prompts from JSONL lines with a "prompt" field; a bad line stops with its number."""
    if not path.is_file():
        raise SamplingError(f"{path}: prompts file not found")
    prompts = []
    for n, row in jsonl_objects(path.read_text(encoding="utf-8"),
                                lambda n, e: SamplingError(f"{path}:{n}: not valid JSON ({e.msg})")):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SamplingError(f"{path}:{n}: expected an object with a non-empty string field 'prompt'")
        prompts.append(row["prompt"])
    if not prompts:
        raise SamplingError(f"{path}: no prompts")
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=kwjax.weights.EMBEDDED, help="gemma3-270m, a .gguf, an HF or kwjax directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts_file", type=Path, help="JSONL, one {\"prompt\": ...} per line")
    p.add_argument("--output", type=Path, help="JSONL output (prompt, text, tokens, logprobs, stop_reason)")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--stop_id", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the Gemma instruction format")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    try:
        cfg = SamplingConfig(args.max_new_tokens, args.greedy, args.temperature, args.top_k, args.top_p,
                             args.seed, tuple(args.stop_id))
        cfg.validate()
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
        model = kwjax.load(args.model, dtype=args.dtype)
        sampler = Sampler(model, batch_size=min(args.batch_size, len(prompts)))
        samples = sampler.generate(prompts, cfg, chat=args.chat, progress=len(prompts) > args.batch_size)
    except (SamplingError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", encoding="utf-8") as f:
            for prompt, s in zip(prompts, samples):
                f.write(json.dumps({"prompt": prompt, "text": s.text, "tokens": s.tokens,
                                    "logprobs": s.logprobs, "stop_reason": s.stop_reason},
                                   ensure_ascii=False) + "\n")
        print(f"wrote {len(samples)} samples to {args.output}")
    else:
        for s in samples:
            print(s.text)
            print(f"[{len(s.tokens)} tokens, stopped: {s.stop_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
