"""The main job for now: load the embedded Gemma 3 270M and continue a prompt greedily."""

from __future__ import annotations

import argparse
import time

import kwjax
from kwjax import sampling
from kwjax.models.gemma3.chat import format_user_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=kwjax.weights.EMBEDDED, help="gemma3-270m, a .gguf, or a model dir")
    parser.add_argument("--prompt", default="바다, 편지, 기다림을 넣어 짧은 시를 써 줘.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat format")
    args = parser.parse_args()

    start = time.time()
    model = kwjax.load(args.model, dtype=args.dtype)
    print(f"loaded {args.model} ({model.config.num_params / 1e6:.0f}M parameters, {model.dtype.name}) "
          f"in {time.time() - start:.1f}s")
    tok = model.tokenizer
    text = format_user_prompt(args.prompt) if args.chat else args.prompt
    ids = tok.encode(text, add_bos=True)
    start = time.time()
    new = sampling.greedy(model, [ids], args.max_new_tokens, stop_ids=(tok.eos_id, tok.end_of_turn_id))[0]
    print(f"--- prompt ---\n{args.prompt}\n--- continuation ({len(new)} tokens, {time.time() - start:.1f}s) ---")
    print(tok.decode(new, skip_special=True))


if __name__ == "__main__":
    main()
