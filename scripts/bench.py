"""Benchmarks, kwjax beside its peers on the same machine in one run. Results go to JSON and stdout.

  python scripts/bench.py sampling [--batch=8 --new_tokens=128 --reps=3 --out=docs/bench_sampling.json]
  python scripts/bench.py load     (peak host memory of loading the embedded model, per dtype)

Peers (transformers, torch) are benchmark dependencies only: `pip install -e .[test]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "바다, 편지, 기다림이라는 세 단어를 넣어 짧은 시를 써 줘.",
    "The lighthouse keeper wrote one letter every winter,",
    "서울의 겨울은",
    "Explain in one paragraph why the sky is blue.",
    "옛날 옛적에 작은 마을에 한 소녀가 살았다. 소녀는 매일 아침",
    "def fibonacci(n):",
    "비가 그친 골목에는 물웅덩이마다 하늘이 한 조각씩 내려와 있었다.",
    "Three things I learned from my grandmother:",
]


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "python": platform.python_version()}


def bench_sampling(args) -> dict:
    import torch
    import transformers

    import kwjax
    from kwjax.paths import embedded_gguf_path
    from kwjax.sampling import Sampler, SamplingConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = kwjax.load("gemma3-270m", dtype=args.dtype)
    tok = model.tokenizer
    prompts = [tok.encode(p, add_bos=True) for p in (PROMPTS * 4)[:args.batch]]
    sampler = Sampler(model, batch_size=args.batch)
    sampler.stop_ids = (-1,)  # never stop early: both sides generate exactly new_tokens per row
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)

    path = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    if args.dtype in ("bfloat16", "bf16"):
        hf = hf.to(torch.bfloat16)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1

    def run_kwjax():
        out = sampler.generate(prompts, cfg)
        assert all(len(s.tokens) == args.new_tokens for s in out)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] - width == args.new_tokens

    t = time.perf_counter(); run_kwjax(); compile_s = time.perf_counter() - t
    run_hf()  # warm-up
    times = {"kwjax": [], "transformers": []}
    for _ in range(args.reps):  # alternate, so drift in machine load hits both alike
        for name, fn in (("kwjax", run_kwjax), ("transformers", run_hf)):
            t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.new_tokens
    result = {"workload": f"Gemma 3 270M {args.dtype}, greedy, batch {args.batch}, {args.new_tokens} new tokens",
              "kwjax_first_call_s (compile + run)": round(compile_s, 2)}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": round(med, 3), "runs_s": [round(x, 3) for x in ts],
                        "tokens_per_s": round(tokens / med, 1)}
    result["speedup"] = round(result["kwjax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 2)
    return result


def bench_load(args) -> dict:
    """Peak RSS of loading the embedded model, in a fresh process per dtype."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        code = (
            "import resource, jax, kwjax, time\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"t = time.perf_counter(); m = kwjax.load('gemma3-270m', dtype='{dtype}', with_tokenizer=False)\n"
            "jax.block_until_ready(m.params); dt = time.perf_counter() - t\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "nbytes = sum(x.nbytes for x in jax.tree.leaves(m.params))\n"
            "print(base, peak, nbytes, dt)\n")
        base, peak, nbytes, dt = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True).stdout.split()
        out[dtype] = {"params_MiB": round(int(nbytes) / 2**20), "peak_rss_growth_MiB": round((int(peak) - int(base)) / 1024),
                      "ratio_to_params": round((int(peak) - int(base)) * 1024 / int(nbytes), 2),
                      "seconds": round(float(dt), 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sampling", "load"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="parameter dtype of both sides (float32, bfloat16)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"machine": machine(), "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
              args.what: {"sampling": bench_sampling, "load": bench_load}[args.what](args)}
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
