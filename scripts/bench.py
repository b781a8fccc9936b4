"""Benchmarks, kwjax beside its peers on the same machine in one run. Results go to JSON and stdout.

  python scripts/bench.py sampling [--batches=1,8,32,64 --modes=greedy,top_p --new_tokens=128 --reps=3 --out=...]
  python scripts/bench.py load     (peak host memory of loading the embedded model, per dtype)
  python scripts/bench.py train    [--steps=8 --warmup=2 --rounds=3 --output=docs/bench_train.json]
                                   (SFT and DPO optimizer steps, kwjax against TRL, alternating fresh processes)
  python scripts/bench.py matmul   (this machine's float32 matmul rate, the yardstick for FLOP fractions)
  python scripts/bench.py profile  [--method=dpo] (where a kwjax step's time goes: its parts timed alone)
  python scripts/bench.py mfu      [--model=preset:gemma3-1b --batch=4] (accelerator: bf16 DPO steps, MFU)
  python scripts/bench.py padding  (real/padded tokens of the shipped set per batching policy; counts only)

Peers (transformers, torch; trl for `train`) are benchmark dependencies only: `pip install -e .[test]`
and `pip install trl`. Without trl, `train` still measures kwjax and says the peer is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

    from kwjax.experiment import machine as describe

    m = describe()
    return {"cpu": m["cpu"], "cores": m["cpu_count"], "jax": m["jax"],
            "devices": [str(d) for d in jax.devices()], "python": m["python"]}


def bench_sampling(args) -> dict:
    """kwjax's Sampler against transformers `generate` per (batch, mode), alternating on the same prompts.

    Every row generates exactly `new_tokens` (stop tokens disabled on both sides), so a cell's tokens/s is
    batch x new_tokens over its median wall time. top-p is 0.95 at temperature 1 with no top-k on both
    sides (transformers' default top_k=50 is switched off: it would be a smaller filter than kwjax's).
    """
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import kwjax
    from kwjax.paths import embedded_gguf_path
    from kwjax.sampling import Sampler, SamplingConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = kwjax.load("gemma3-270m", dtype=args.dtype)
    tok = model.tokenizer
    path = embedded_gguf_path()
    hf = None
    if not args.no_peer:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        if args.dtype in ("bfloat16", "bf16"):
            hf = hf.to(torch.bfloat16)
    batches = [int(b) for b in str(args.batches or args.batch).split(",")]
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"greedy", "top_p"})
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected greedy and/or top_p")
    cells, n = [], args.new_tokens
    for batch in batches:
        prompts = [tok.encode(p, add_bos=True) for p in (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]]
        sampler = Sampler(model, batch_size=batch)
        sampler.stop_ids = (-1,)  # never stop early: both sides generate exactly new_tokens per row
        width = max(map(len, prompts))
        ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        for mode in modes:
            greedy = mode == "greedy"
            cfg = SamplingConfig(max_new_tokens=n, greedy=greedy, top_p=1.0 if greedy else 0.95)
            hf_kw = dict(do_sample=False) if greedy else dict(do_sample=True, top_p=0.95, top_k=0, temperature=1.0)

            def run_kwjax(cfg=cfg):
                out = sampler.generate(prompts, cfg)
                assert all(len(s.tokens) == n for s in out)

            def run_hf(hf_kw=hf_kw):
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                      **hf_kw)
                assert out.shape[1] - width == n

            t = time.perf_counter(); run_kwjax(); compile_s = time.perf_counter() - t
            fns = [("kwjax", run_kwjax)]
            if hf is not None:
                run_hf()  # warm-up
                fns.append(("transformers", run_hf))
            times = {name: [] for name, _ in fns}
            for _ in range(args.reps):  # alternate, so drift in machine load hits both alike
                for name, fn in fns:
                    t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
            # The per-token decode step: the same call stopped after its first token (prefill + host work;
            # `_time`'s untimed first call compiles its own cache length) subtracted from the full call.
            _, one_token_s = _time(sampler.generate, prompts, dataclasses.replace(cfg, max_new_tokens=1),
                                   reps=args.reps)
            cell = {"batch": batch, "mode": mode, "kwjax_first_call_s (compile + run)": round(compile_s, 2),
                    "kwjax_one_token_call_s": round(one_token_s, 3),
                    "kwjax_decode_step_ms": round((statistics.median(times["kwjax"]) - one_token_s) / (n - 1) * 1e3, 2)}
            for name, ts in times.items():
                med = statistics.median(ts)
                cell[name] = {"median_s": round(med, 3), "runs_s": [round(x, 3) for x in ts],
                              "tokens_per_s": round(batch * n / med, 1)}
            if "transformers" in cell:
                cell["speedup"] = round(cell["kwjax"]["tokens_per_s"] / cell["transformers"]["tokens_per_s"], 2)
            print(json.dumps(cell), file=sys.stderr, flush=True)
            cells.append(cell)
    embedding = model.params["embedding"]
    _, stream_s = _time(jax.jit(lambda e: jnp.sum(e.astype(jnp.float32))), embedding, reps=max(5, args.reps))
    return {"workload": f"Gemma 3 270M {args.dtype}, batches {batches}, modes {modes}, {n} new tokens per row",
            "cells": cells, "summary": sampling_summary(cells),
            "stream_embedding_ms (jnp.sum over it)": round(stream_s * 1e3, 2),
            "stream_GB_per_s": round(embedding.nbytes / stream_s / 1e9, 1)}


def sampling_summary(cells: list[dict]) -> dict:
    """The issue's ratios from one run's cells: throughput at a batch over batch 8, kwjax over
    transformers, top-p time over greedy time at the same batch."""
    by = {(c["batch"], c["mode"]): c for c in cells}
    out: dict = {}
    for (batch, mode), c in sorted(by.items()):
        row = {}
        if (8, mode) in by and batch != 8:
            row["kwjax_tokens_per_s_over_batch_8"] = round(
                c["kwjax"]["tokens_per_s"] / by[(8, mode)]["kwjax"]["tokens_per_s"], 2)
        if "speedup" in c:
            row["kwjax_over_transformers"] = c["speedup"]
        if mode == "top_p" and (batch, "greedy") in by:
            row["kwjax_top_p_time_over_greedy"] = round(
                c["kwjax"]["median_s"] / by[(batch, "greedy")]["kwjax"]["median_s"], 2)
            if "transformers" in c:
                row["transformers_top_p_time_over_greedy"] = round(
                    c["transformers"]["median_s"] / by[(batch, "greedy")]["transformers"]["median_s"], 2)
        out[f"batch {batch} {mode}"] = row
    return out


def sampling_table(result: dict) -> str:
    lines = ["| batch | mode | kwjax tokens/s | transformers tokens/s | kwjax ÷ transformers | kwjax decode step ms "
             "| kwjax ÷ its batch 8 | top-p ÷ greedy time (kwjax) |", "| --- " * 8 + "|"]
    for c in result["cells"]:
        s = result["summary"][f"batch {c['batch']} {c['mode']}"]
        hf = c.get("transformers", {}).get("tokens_per_s", "")
        lines.append(f"| {c['batch']} | {c['mode']} | {c['kwjax']['tokens_per_s']} | {hf} | {c.get('speedup', '')} "
                     f"| {c['kwjax_decode_step_ms']} | {s.get('kwjax_tokens_per_s_over_batch_8', '')} "
                     f"| {s.get('kwjax_top_p_time_over_greedy', '')} |")
    return "\n".join(lines)


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


# ---- training: kwjax against TRL ------------------------------------------------------------------
#
# One fixed workload for both: Gemma 3 270M (the embedded GGUF, dequantized to float32; TRL trains the
# same weights exported once with kwjax.export_hf), batch 4 (SFT: 4 sequences; DPO: 4 pairs, i.e. 8
# sequences), every sequence exactly PROMPT_LEN prompt + RESPONSE_LEN response tokens (no padding on
# either side), AdamW with the same learning rate, no gradient accumulation, float32, no evaluation,
# saving or logging. Each (framework, method, reference) cell runs in its own fresh process, so peak
# memory is per framework; rounds alternate kwjax / TRL so drift in machine load hits both alike.

PROMPT_LEN = 48
RESPONSE_LEN = 96
BATCH = 4
LEARNING_RATE = {"sft": 2e-5, "dpo": 5e-6}  # configs/experiment.py's per-method rates, on both sides
DPO_BETA = 0.1
REPO = Path(__file__).resolve().parents[1]

# (framework, method, reference) cells; reference is None for SFT
CELLS = [
    ("kwjax", "sft", None), ("trl", "sft", None),
    ("kwjax", "dpo", "precomputed"), ("trl", "dpo", "precomputed"),
    ("kwjax", "dpo", "on_the_fly"), ("trl", "dpo", "on_the_fly"),
]
DEFAULT_REFERENCE = {"kwjax": "precomputed", "trl": "on_the_fly"}  # what each does when not told


def cell_name(framework: str, method: str, reference: str | None, variant: str = "") -> str:
    return f"{framework}/{method}" + (f"/{reference}" if reference else "") + (f"[{variant}]" if variant else "")


def parse_variants(text: str) -> dict[str, list[str]]:
    """--variants "NAME:KEY=VALUE,KEY=VALUE;NAME2:..." -> {NAME: ["KEY=VALUE", ...]} (an empty list: as is)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, sets = part.partition(":")
        out[name.strip()] = [x.strip() for x in sets.split(",") if x.strip()]
    return out


def _fit(head: list[int], streams: list[list[int]], tail: list[int], length: int) -> list[int]:
    """head + content + tail of exactly `length` tokens; content is the streams concatenated, cut to fit."""
    room = length - len(head) - len(tail)
    content: list[int] = []
    for s in streams:
        content.extend(s)
        if len(content) >= room:
            break
    if len(content) < room:
        raise ValueError(f"not enough text to fill {length} tokens")
    return head + content[:room] + tail


def build_workload(tokenizer, rows: int) -> dict:
    """Token ids of `rows` SFT sequences and `rows` DPO pairs from the shipped keyword-literature set.

    Each sequence is the Gemma chat exchange, fitted to exactly PROMPT_LEN + RESPONSE_LEN tokens: the
    prompt keeps `<bos><start_of_turn>user\\n` and `<end_of_turn>\\n<start_of_turn>model\\n` around the
    user text (cut, or continued with the next rows' instructions); the response is the passage (cut, or
    continued with the next rows' chosen passages) ending with `<end_of_turn>`.
    """
    from kwjax import batching, data

    examples = data.load_examples()
    enc = []
    for ex in examples:
        c = batching.encode_exchange(tokenizer, ex.instruction, ex.chosen)
        r = batching.encode_exchange(tokenizer, ex.instruction, ex.rejected)
        enc.append((list(c.prompt), list(c.response), list(r.response)))
    head_n, tail_n = 4, 5  # <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n
    eot = tokenizer.end_of_turn_id
    n = len(enc)

    def prompt(i):
        p = enc[i % n][0]
        nxt = [enc[(i + k) % n][0][head_n:-tail_n] for k in range(1, 6)]
        return _fit(p[:head_n], [p[head_n:-tail_n], *nxt], p[-tail_n:], PROMPT_LEN)

    def response(i, ids):
        nxt = [enc[(i + k) % n][1][:-1] for k in range(1, 6)]
        return _fit([], [ids[:-1], *nxt], [eot], RESPONSE_LEN)

    sft, dpo = [], []
    for i in range(rows):
        p = prompt(i)
        sft.append({"prompt_ids": p, "response_ids": response(i, enc[i % n][1])})
        dpo.append({"prompt_ids": p, "chosen_ids": response(i, enc[i % n][1]),
                    "rejected_ids": response(i, enc[i % n][2])})
    assert enc[0][0][:head_n][0] == tokenizer.bos_id and enc[0][1][-1] == eot
    return {"prompt_len": PROMPT_LEN, "response_len": RESPONSE_LEN, "sft": sft, "dpo": dpo}


def _proc_status(key: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM); the bench needs Linux's /proc."""
    from kwjax.memory import status_kib

    value = status_kib(key)
    if value is None:
        raise KeyError(f"/proc/self/status has no {key} (the memory columns need Linux)")
    return value


def _reset_peak() -> None:
    """Resets VmHWM (the peak resident set) to the current RSS."""
    from kwjax.memory import reset_peak

    reset_peak()


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def bench_config(method: str, reference: str | None, total_steps: int, batch: int = BATCH, compute_dtype: str = ""):
    """configs/experiment.py, set to the benchmark's workload (batch 4, exact lengths, constant rate)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiment_config", REPO / "configs" / "experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.batch_size = batch
    c.grad_accum = 1
    if compute_dtype:
        c.compute_dtype = compute_dtype
    c.data.max_length = PROMPT_LEN + RESPONSE_LEN
    c.data.length_bucket = 48  # 144 and 96 are multiples: no padding at all
    assert (PROMPT_LEN + RESPONSE_LEN) % c.data.length_bucket == 0 and RESPONSE_LEN % c.data.length_bucket == 0
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0
    c.sft.learning_rate = LEARNING_RATE["sft"]
    c.dpo.learning_rate = LEARNING_RATE["dpo"]
    c.dpo.beta = DPO_BETA
    c.dpo.loss_type = "sigmoid"
    if reference:
        c.dpo.reference = reference
    c.max_steps = total_steps
    return c


def _kwjax_data(workload: dict, method: str):
    from kwjax import batching, feed

    if method == "sft":
        items = [batching.Sequence_(tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in workload["sft"]]
    else:
        items = [(batching.Sequence_(tuple(r["prompt_ids"]), tuple(r["chosen_ids"])),
                  batching.Sequence_(tuple(r["prompt_ids"]), tuple(r["rejected_ids"]))) for r in workload["dpo"]]
    return feed.Data(items, [str(i) for i in range(len(items))], batching.Report(rows=len(items)), method)


def kwjax_setup(method: str, reference: str | None, total_steps: int, workload: dict, dtype: str = "float32", *,
                model: str = "gemma3-270m", batch: int = BATCH, compute_dtype: str = "",
                overrides: dict | None = None, on_loaded=None):
    """What kwjax.train.train runs before its loop: the model load, then `kwjax.prepare.prepare` on the
    benchmark's workload (mesh, sharded trees, optimizer, reference pass, donated state, jitted step).

    Returns a dict with `prepared`, `state`, `ref_tree`, `frozen`, `step_fn` (jitted, not yet compiled),
    `batches` (one per step, on device), the reference pass's per-batch times and `load_s`. `model`: a
    kwjax.load source, or "preset:NAME" (kwjax.models.gemma3.config.PRESETS, random weights: enough for timing, e.g.
    "preset:gemma3-1b" without a checkpoint). `overrides` sets config fields ("remat", "logprob_chunk",
    "dpo.reference", "freeze", …) before anything is built; `on_loaded()` runs between load and prepare.
    """
    import jax

    import kwjax
    from kwjax.prepare import prepare

    t = time.perf_counter()
    if model.startswith("preset:"):
        from kwjax.models.gemma3.config import PRESETS
        from kwjax.models.gemma3.model import init_params
        from kwjax.weights import LoadedModel, parse_dtype

        mcfg = PRESETS[model.split(":", 1)[1]]()
        model = LoadedModel(mcfg, init_params(mcfg, jax.random.PRNGKey(0), parse_dtype(dtype)), None, model)
    else:
        model = kwjax.load(model, dtype=dtype, with_tokenizer=False)
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t
    config = bench_config(method, reference, total_steps, batch, compute_dtype)
    for key, value in (overrides or {}).items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    if on_loaded is not None:
        on_loaded()
    ref_times: list[float] = []
    prepared = prepare(config, method, model, data=(_kwjax_data(workload, method), None),
                       on_reference_batch=lambda i, seconds: ref_times.append(seconds))
    model_config = model.config
    del model
    batches = [prepared.batch("train", list(range(i * batch, (i + 1) * batch))) for i in range(total_steps)]
    rows = batch if method == "sft" else 2 * batch
    for b in batches:  # the exact workload: no padding anywhere
        assert b["tokens_BT"].shape == (rows, PROMPT_LEN + RESPONSE_LEN), b["tokens_BT"].shape
        assert b["targets_BR"].shape == (rows, RESPONSE_LEN) and bool(b["target_mask_BR"].all())
        assert bool(b["valid_BT"].all()) and bool(b["example_mask_B"].all())
    out = {"prepared": prepared, "config": config, "module": prepared.module, "model_config": model_config,
           "state": prepared.state, "ref_tree": prepared.ref, "frozen": prepared.frozen, "tx": prepared.tx,
           "step_fn": prepared.step_fn.jitted, "on_the_fly": prepared.on_the_fly, "batches": batches,
           "load_s": load_s}
    if ref_times:
        rest = ref_times[1:] or ref_times
        out["reference"] = {"batches": len(ref_times), "first_batch_s": round(ref_times[0], 3),
                            "per_batch_s": round(statistics.median(rest), 4), "total_s": round(sum(ref_times), 2)}
    return out


def kwjax_worker(method: str, reference: str | None, warmup: int, steps: int, workload: dict,
                 overrides: dict | None = None) -> dict:
    import jax

    from kwjax.step import release_freed_memory

    total = warmup + steps
    _reset_peak()
    base_kib = _proc_status("VmRSS")
    marks = {}

    def loaded():  # from here on: the training peak (reference pass, state init, compile, steps)
        marks["loaded_kib"], marks["load_peak_kib"] = _proc_status("VmRSS"), _proc_status("VmHWM")
        _reset_peak()

    s = kwjax_setup(method, reference, total, workload, overrides=overrides, on_loaded=loaded)
    state, ref_tree, frozen, batches = s["state"], s["ref_tree"], s["frozen"], s["batches"]
    s["prepared"].state = None  # this loop owns the state (donated to every step)
    t = time.perf_counter()
    compiled = s["step_fn"].lower(state, batches[0], ref_tree, frozen).compile()
    compile_s = time.perf_counter() - t
    release_freed_memory()  # as kwjax.step.CompiledSteps does before a step first runs
    times, losses = [], []
    for i in range(total):
        t = time.perf_counter()
        state, metrics = compiled(state, batches[i], ref_tree, frozen)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
        if i == 0:
            first_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    train_peak_kib = _proc_status("VmHWM")
    load_peak_kib = marks["load_peak_kib"]
    return {"step_s": times[warmup:], "warmup_step_s": times[:warmup], "compile_s": compile_s,
            "first_step_s": times[0], "load_s": s["load_s"], "reference": s.get("reference"),
            "losses": losses, "first_metrics": first_metrics,
            "rss_before_load_MiB": _mib(base_kib), "rss_after_load_MiB": _mib(marks["loaded_kib"]),
            "peak_load_MiB": _mib(load_peak_kib), "peak_train_MiB": _mib(train_peak_kib),
            "peak_total_MiB": _mib(max(load_peak_kib, train_peak_kib)),
            "versions": {"jax": jax.__version__}, "config": {
                "logprob_chunk": s["config"].logprob_chunk, "remat": s["config"].remat,
                "overrides": overrides or {},
                "reference": reference, "learning_rate": LEARNING_RATE[method]}}


def trl_worker(method: str, reference: str | None, warmup: int, steps: int, workload: dict, hf_dir: str,
               gradient_checkpointing: bool) -> dict:
    import tempfile

    _reset_peak()
    base_kib = _proc_status("VmRSS")
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    total = warmup + steps
    rows = total * BATCH
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    timing: dict = {"times": [], "losses": [], "ref_batches": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timing["peak_load_kib"] = _proc_status("VmHWM")
            timing["loaded_kib"] = _proc_status("VmRSS")
            _reset_peak()  # from here on: the training peak (optimizer state, steps)

        def on_step_begin(self, args, state, control, **kw):
            timing["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timing["times"].append(time.perf_counter() - timing["t"])

    common = dict(output_dir=tempfile.mkdtemp(prefix="kwjax-bench-trl-"), per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=1, max_steps=total, learning_rate=LEARNING_RATE[method],
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, use_cpu=True, bf16=False, fp16=False,
                  report_to=[], save_strategy="no",
                  eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                  train_sampling_strategy="sequential", seed=0, max_length=PROMPT_LEN + RESPONSE_LEN)

    # TRL turns gradient (activation) checkpointing on by default; transformers 5 renamed the argument
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    common["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = \
        gradient_checkpointing

    def record_loss(loss):
        timing["losses"].append(float(loss.detach()))
        return loss

    if method == "sft":
        ds = datasets.Dataset.from_list([
            {"input_ids": r["prompt_ids"] + r["response_ids"],
             "completion_mask": [0] * len(r["prompt_ids"]) + [1] * len(r["response_ids"])}
            for r in workload["sft"][:rows]])

        class Trainer(trl.SFTTrainer):
            def compute_loss(self, *a, **kw):
                return record_loss(super().compute_loss(*a, **kw))

        args = trl.SFTConfig(**common, completion_only_loss=True, packing=False, padding_free=False)
        trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[Timer()])
    else:
        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                         for r in workload["dpo"][:rows]])

        class Trainer(trl.DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **kw):
                return dataset  # already token ids: prompt_ids, chosen_ids, rejected_ids (what TRL's own map makes)

            def compute_ref_log_probs(self, *a, **kw):
                t = time.perf_counter()
                out = super().compute_ref_log_probs(*a, **kw)
                timing["ref_batches"].append(time.perf_counter() - t)
                return out

            def compute_loss(self, *a, **kw):
                return record_loss(super().compute_loss(*a, **kw))

        args = trl.DPOConfig(**common, beta=DPO_BETA, loss_type=["sigmoid"],
                             precompute_ref_log_probs=reference == "precomputed")
        trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[Timer()])
    setup_s = time.perf_counter() - t0
    # TRL sees exactly the workload: every row PROMPT_LEN + RESPONSE_LEN tokens, RESPONSE_LEN of them trained on
    batch = next(iter(trainer.get_train_dataloader()))
    n_rows = BATCH if method == "sft" else 2 * BATCH
    assert tuple(batch["input_ids"].shape) == (n_rows, PROMPT_LEN + RESPONSE_LEN), batch["input_ids"].shape
    assert bool(batch["attention_mask"].all())
    if method == "sft":
        assert (batch["labels"] != -100).sum(1).tolist() == [RESPONSE_LEN] * n_rows
    else:
        assert batch["completion_mask"].sum(1).tolist() == [RESPONSE_LEN] * n_rows
    trainer.train()
    train_peak_kib = _proc_status("VmHWM")
    times = timing["times"]
    assert len(times) == total, (len(times), total)
    ref = None
    if timing["ref_batches"] and reference == "precomputed":
        rb = timing["ref_batches"]
        ref = {"batches": len(rb), "first_batch_s": round(rb[0], 3),
               "per_batch_s": round(statistics.median(rb[1:] or rb), 4), "total_s": round(sum(rb), 2)}
    first_metrics = {k: v[0] for k, v in trainer._metrics["train"].items() if isinstance(v, list) and v}
    return {"step_s": times[warmup:], "warmup_step_s": times[:warmup], "compile_s": None,
            "first_step_s": times[0], "load_s": setup_s, "reference": ref, "losses": timing["losses"],
            "first_metrics": first_metrics,
            "rss_before_load_MiB": _mib(base_kib), "rss_after_load_MiB": _mib(timing["loaded_kib"]),
            "peak_load_MiB": _mib(timing["peak_load_kib"]), "peak_train_MiB": _mib(train_peak_kib),
            "peak_total_MiB": _mib(max(timing["peak_load_kib"], train_peak_kib)),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__, "torch_threads": torch.get_num_threads()},
            "config": {"attn_implementation": model.config._attn_implementation, "optim": str(args.optim),
                       "gradient_checkpointing": bool(getattr(args, "activation_checkpointing", None)
                                                     or args.gradient_checkpointing), "reference": reference,
                       "learning_rate": LEARNING_RATE[method]}}


def bench_worker(args) -> None:
    """One cell in this (fresh) process; prints one JSON line prefixed with RESULT."""
    workload = json.loads(Path(args.workload).read_text())
    reference = args.reference or None
    if args.framework == "kwjax":
        result = kwjax_worker(args.method, reference, args.warmup, args.steps, workload, parse_overrides(args.set))
    else:
        result = trl_worker(args.method, reference, args.warmup, args.steps, workload, args.hf_dir,
                            args.trl_gradient_checkpointing)
    print("RESULT " + json.dumps(result))


def trl_available() -> str | None:
    """None if the peer can run, else why not."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "trl", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def hf_export_dir(dtype: str = "float32") -> Path:
    """The embedded model as a transformers directory (kwjax.export_hf), written once into the cache."""
    from kwjax.paths import cache_dir, embedded_gguf_path

    src = embedded_gguf_path()
    directory = cache_dir() / "bench" / f"gemma3-270m-hf-{dtype}-{src.stat().st_size}"
    if not (directory / "config.json").is_file():
        import kwjax

        model = kwjax.load("gemma3-270m", dtype=dtype)
        tmp = directory.with_name(directory.name + ".tmp")
        kwjax.export_hf(model, tmp)
        tmp.replace(directory)
    return directory


def _run_cell(framework, method, reference, args, workload_path, hf_dir, variant: str = "") -> dict:
    """One cell in a fresh process. "baseline" is kwjax from the checkout `--baseline` names (its own
    scripts/bench.py and package, first on PYTHONPATH): before and after a change, side by side."""
    import os

    script, env = Path(__file__).resolve(), None
    if framework == "baseline":
        root = Path(args.baseline).resolve()
        script, env = root / "scripts" / "bench.py", {**os.environ, "PYTHONPATH": str(root)}
        framework = "kwjax"
    cmd = [sys.executable, str(script), "worker", "--framework", framework, "--method", method,
           "--reference", reference or "", "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--workload", str(workload_path), "--hf_dir", str(hf_dir)]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl_gradient_checkpointing")
    if framework == "kwjax":
        cmd += [f"--set={item}" for item in args.set + parse_variants(args.variants).get(variant, [])]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["process_wall_s"] = round(wall, 1)
            return out
    tail = (proc.stderr or proc.stdout)[-3000:]
    return {"error": f"exit {proc.returncode}", "stderr_tail": tail, "process_wall_s": round(wall, 1)}


def matmul_rate(n: int = 2048, reps: int = 20, dtype: str = "float32") -> dict:
    """GFLOP/s of an n×n jnp.dot (median of reps, after a warm-up), and, on CPU in float32, torch's too."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    flop = 2 * n**3
    out = {"n": n, "dtype": dtype, "device": jax.devices()[0].device_kind, "reps": reps,
           "jax_median_s": round(statistics.median(ts), 5),
           "jax_gflops": round(flop / statistics.median(ts) / 1e9, 1),
           "jax_best_gflops": round(flop / min(ts) / 1e9, 1)}
    if jax.default_backend() != "cpu" or dtype != "float32":
        return out
    try:
        import torch
    except ImportError:
        return out
    ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
    ta @ tb
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        ta @ tb
        ts.append(time.perf_counter() - t)
    out.update(torch_median_s=round(statistics.median(ts), 5), torch_gflops=round(flop / statistics.median(ts) / 1e9, 1),
               torch_best_gflops=round(flop / min(ts) / 1e9, 1), torch_threads=torch.get_num_threads())
    return out


def bench_matmul(args) -> dict:
    return matmul_rate(args.matmul_n, args.reps, args.dtype)


def _matmul_subprocess(n: int) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench; " \
           f"print('RESULT ' + json.dumps(bench.matmul_rate({n})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": proc.stderr[-2000:]}


def _summarize(runs: list[dict], method: str, framework: str, reference: str | None, model_config,
               matmul_gflops: float | None) -> dict:
    from kwjax import flops

    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error") if runs else "not run",
                "stderr_tail": runs[-1].get("stderr_tail") if runs else None}
    steps = [t for r in ok for t in r["step_s"]]
    med = statistics.median(steps)
    tokens = flops.tokens_per_step(method, BATCH, PROMPT_LEN, RESPONSE_LEN)
    sf = flops.train_step_flops(model_config, method=method, batch=BATCH, prompt_len=PROMPT_LEN,
                                response_len=RESPONSE_LEN, logits="all" if framework == "trl" else "response",
                                reference=reference or "precomputed")
    out = {"step_s_median": round(med, 3), "step_s_per_round": [round(statistics.median(r["step_s"]), 3) for r in ok],
           "step_s_min": round(min(steps), 3), "step_s_max": round(max(steps), 3), "steps_measured": len(steps),
           "tokens_per_step": tokens, "tokens_per_s": round(tokens / med, 1),
           "first_step_s": round(statistics.median(r["first_step_s"] for r in ok), 2),
           "compile_s": (round(statistics.median(r["compile_s"] for r in ok), 2)
                         if ok[0]["compile_s"] is not None else None),
           "load_s": round(statistics.median(r["load_s"] for r in ok), 2),
           "peak_train_MiB": max(r["peak_train_MiB"] for r in ok),
           "peak_total_MiB": max(r["peak_total_MiB"] for r in ok),
           "rss_after_load_MiB": max(r["rss_after_load_MiB"] for r in ok),
           "flops": sf.as_dict(), "model_tflops_per_s": round(sf.model / med / 1e12, 4),
           "first_losses": ok[0]["losses"][:3], "first_metrics": ok[0]["first_metrics"],
           "versions": ok[0]["versions"], "config": ok[0]["config"], "failed_rounds": len(runs) - len(ok)}
    if matmul_gflops:
        out["fraction_of_matmul_rate"] = round(flops.matmul_fraction(sf.model, med, matmul_gflops * 1e9), 3)
    refs = [r["reference"] for r in ok if r.get("reference")]
    if refs:
        per = statistics.median(x["per_batch_s"] for x in refs)
        out["reference_pass"] = {"per_batch_s": round(per, 3), "first_batch_s": refs[0]["first_batch_s"],
                                 "batches": refs[0]["batches"]}
        out["step_plus_reference_s"] = round(med + per, 3)  # one epoch: one reference forward per step
    return out


# (label, kwjax cell, TRL cell, target step-time ratio, target peak-memory ratio) — the targets
RATIOS = [
    ("SFT", ("kwjax", "sft", None), ("trl", "sft", None), 0.6, None),
    ("DPO, each framework's default (kwjax precomputed reference, TRL reference model)",
     ("kwjax", "dpo", "precomputed"), ("trl", "dpo", "on_the_fly"), 0.5, 0.6),
    ("DPO, reference precomputed on both", ("kwjax", "dpo", "precomputed"), ("trl", "dpo", "precomputed"), None, None),
    ("DPO, reference on the fly on both", ("kwjax", "dpo", "on_the_fly"), ("trl", "dpo", "on_the_fly"), None, None),
]


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def bench_train(args) -> dict:
    import tempfile

    from kwjax.models.gemma3.config import PRESETS

    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    peer_missing = trl_available() if "trl" in frameworks else None
    cells = [c for c in CELLS if c[0] in frameworks and c[1] in methods and not (c[0] == "trl" and peer_missing)]
    if args.baseline:  # each kwjax cell, then the same cell of the baseline checkout
        cells = [x for c in cells for x in ([c, ("baseline", *c[1:])] if c[0] == "kwjax" else [c])]
    variants = parse_variants(args.variants)
    if variants:  # each kwjax cell once per variant, in turn within every round
        cells = [x for c in cells for x in ([(*c, v) for v in variants] if c[0] == "kwjax" else [c])]
    total = args.warmup + args.steps

    from kwjax.paths import embedded_gguf_path
    from kwjax.tokenizer import load_tokenizer

    workload = build_workload(load_tokenizer(embedded_gguf_path()), total * BATCH)
    tmp = Path(tempfile.mkdtemp(prefix="kwjax-bench-"))
    workload_path = tmp / "workload.json"
    workload_path.write_text(json.dumps(workload))
    hf_dir = hf_export_dir() if any(c[0] == "trl" for c in cells) else ""

    matmul = {"before": _matmul_subprocess(args.matmul_n)} if not args.no_matmul else {}
    runs: dict[str, list[dict]] = {cell_name(*c): [] for c in cells}
    started = time.perf_counter()
    for r in range(args.rounds):
        for c in cells:  # kwjax, TRL, kwjax, TRL, ... each in a fresh process
            name = cell_name(*c)
            print(f"[round {r + 1}/{args.rounds}] {name} ...", file=sys.stderr, flush=True)
            res = _run_cell(*c[:3], args, workload_path, hf_dir, *c[3:])
            runs[name].append(res)
            if "error" in res:
                print(f"  failed: {res['error']}\n{res['stderr_tail']}", file=sys.stderr, flush=True)
            else:
                print(f"  median step {statistics.median(res['step_s']):.3f} s, peak train "
                      f"{res['peak_train_MiB']:.0f} MiB ({res['process_wall_s']} s)", file=sys.stderr, flush=True)
    if not args.no_matmul:
        matmul["after"] = _matmul_subprocess(args.matmul_n)
    rates = [m.get("jax_gflops") for m in matmul.values() if m.get("jax_gflops")]
    matmul_gflops = max(rates) if rates else None

    model_config = PRESETS["gemma3-270m"]()
    results = {name: _summarize(rs, c[1], c[0], c[2], model_config, matmul_gflops)
               for (name, rs), c in zip(runs.items(), cells)}
    over_first_variant = {}
    for c in cells:
        if len(c) == 4 and c[3] != next(iter(variants)):
            ra, rb = results.get(cell_name(*c)), results.get(cell_name(*c[:3], next(iter(variants))))
            if ra and rb and "error" not in ra and "error" not in rb:
                over_first_variant[cell_name(*c)] = {
                    "step_time": _ratio(ra["step_s_median"], rb["step_s_median"]),
                    "peak_train_memory": _ratio(ra["peak_train_MiB"], rb["peak_train_MiB"])}
    ratios = {}
    for label, a, b, time_target, memory_target in RATIOS:
        ra, rb = results.get(cell_name(*a)), results.get(cell_name(*b))
        if not ra or not rb or "error" in ra or "error" in rb:
            continue
        ratios[label] = {"kwjax": cell_name(*a), "trl": cell_name(*b),
                         "step_time": _ratio(ra["step_s_median"], rb["step_s_median"]),
                         "peak_train_memory": _ratio(ra["peak_train_MiB"], rb["peak_train_MiB"]),
                         "peak_total_memory": _ratio(ra["peak_total_MiB"], rb["peak_total_MiB"]),
                         "target_step_time": time_target, "target_peak_memory": memory_target}
    over_baseline = {}
    for c in cells if args.baseline else []:
        ra, rb = results.get(cell_name(*c)), results.get(cell_name("baseline", *c[1:]))
        if c[0] == "kwjax" and ra and rb and "error" not in ra and "error" not in rb:
            over_baseline[cell_name(*c)] = {"step_time": _ratio(ra["step_s_median"], rb["step_s_median"]),
                                            "peak_train_memory": _ratio(ra["peak_train_MiB"], rb["peak_train_MiB"])}
    return {"baseline": str(args.baseline) if args.baseline else None, "ratios_over_baseline": over_baseline,
            "variants": variants, "ratios_over_first_variant": over_first_variant,
            "workload": {"model": "Gemma 3 270M (embedded GGUF, dequantized), float32, CPU",
                         "batch": f"{BATCH} (SFT sequences / DPO pairs)", "prompt_tokens": PROMPT_LEN,
                         "response_tokens": RESPONSE_LEN, "optimizer": "AdamW, constant lr, clip 1.0, wd 0",
                         "learning_rate": LEARNING_RATE, "dpo_beta": DPO_BETA, "warmup_steps": args.warmup,
                         "measured_steps_per_round": args.steps, "rounds": args.rounds,
                         "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                         "kwjax_overrides": parse_overrides(args.set)},
            "peer": peer_missing or "trl", "matmul": matmul, "results": results, "ratios_kwjax_over_trl": ratios,
            "wall_s": round(time.perf_counter() - started, 1)}


def train_table(result: dict) -> str:
    """The markdown tables of a `train` result."""
    res = result["results"]
    lines = ["| run | s/step (median) | tokens/s | first step (compile) s | reference pass s/batch | "
             "peak train MiB | peak incl. load MiB | model TFLOP/step | fraction of matmul rate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        first = f"{r['first_step_s']}" + (f" ({r['compile_s']})" if r.get("compile_s") is not None else "")
        ref = r.get("reference_pass", {}).get("per_batch_s", "")
        lines.append(f"| {name} | {r['step_s_median']} | {r['tokens_per_s']} | {first} | {ref} | "
                     f"{r['peak_train_MiB']:.0f} | {r['peak_total_MiB']:.0f} | "
                     f"{r['flops']['model_flops'] / 1e12:.3f} | {r.get('fraction_of_matmul_rate', '')} |")
    if result.get("peer") != "trl":
        lines.append(f"\nPeer (TRL) {result['peer']}: kwjax rows only.")
    if result.get("ratios_over_baseline"):
        lines += ["", f"| cell | step time ÷ baseline ({result['baseline']}) | peak train memory ÷ baseline |",
                  "| --- | --- | --- |"]
        lines += [f"| {k} | {v['step_time']} | {v['peak_train_memory']} |"
                  for k, v in result["ratios_over_baseline"].items()]
    if result.get("ratios_over_first_variant"):
        first = next(iter(result["variants"]))
        lines += ["", f"| cell | step time ÷ [{first}] | peak train memory ÷ [{first}] |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['step_time']} | {v['peak_train_memory']} |"
                  for k, v in result["ratios_over_first_variant"].items()]
        lines += ["", "Variants (config overrides): " + "; ".join(
            f"{k}: {', '.join(v) or 'as configured'}" for k, v in result["variants"].items())]
    if result.get("ratios_kwjax_over_trl"):
        lines += ["", "| comparison | step time kwjax ÷ TRL | target | peak train memory kwjax ÷ TRL | target | "
                  "peak incl. load |", "| --- | --- | --- | --- | --- | --- |"]

        def target(ratio, goal):
            if goal is None:
                return ""
            return f"≤ {goal} " + ("met" if ratio is not None and ratio <= goal else "**not met**")

        for label, r in result["ratios_kwjax_over_trl"].items():
            lines.append(f"| {label} | {r['step_time']} | {target(r['step_time'], r['target_step_time'])} | "
                         f"{r['peak_train_memory']} | {target(r['peak_train_memory'], r['target_peak_memory'])} | "
                         f"{r['peak_total_memory']} |")
    return "\n".join(lines)


# ---- profile: where a kwjax step's time goes -------------------------------------------------------


def _time(fn, *a, reps: int):
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t)
    return first, statistics.median(ts)


def parse_overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items (VALUE a Python literal, else a string)."""
    import ast

    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def bench_profile(args) -> dict:
    """The kwjax step of the `train` workload cut into parts, each jitted and timed alone (median of reps):
    the backbone forward, its forward + backward, the vocabulary projection / log-softmax (response
    positions, chunked) forward and forward + backward, the whole loss forward + backward, the optimizer
    update, and the full donated train step. `--trace DIR` also writes a jax.profiler trace of full steps."""
    import jax
    import jax.numpy as jnp

    from kwjax import flops, losses, objectives
    from kwjax import step as steplib
    from kwjax.models.gemma3.model import positions_from_mask
    from kwjax.paths import embedded_gguf_path
    from kwjax.tokenizer import load_tokenizer

    method, reference = args.method, (args.reference or ("precomputed" if args.method == "dpo" else None))
    if method == "sft":
        reference = None
    reps = args.reps
    total = reps + 2
    workload = build_workload(load_tokenizer(embedded_gguf_path()), total * BATCH)
    s = kwjax_setup(method, reference, total, workload, overrides=parse_overrides(args.set))
    module, config, cfg = s["module"], s["config"], s["model_config"]
    batch, ref_tree, frozen = s["batches"][0], s["ref_tree"], s["frozen"]
    params = s["prepared"].params()  # the whole model, for the parts that run the module directly
    chunk = config.logprob_chunk
    rows = BATCH if method == "sft" else 2 * BATCH
    seq = PROMPT_LEN + RESPONSE_LEN
    fwd_fl = flops.forward_flops(cfg, rows=rows, seq_len=seq, logit_positions=RESPONSE_LEN)
    parts: dict[str, dict] = {}

    def record(name, fn, *a, fl=None):
        first, med = _time(fn, *a, reps=reps)
        parts[name] = {"median_s": round(med, 4), "first_call_s": round(first, 2)}
        if fl:
            parts[name]["gflops"] = round(fl / 1e9, 1)
            parts[name]["gflop_per_s"] = round(fl / med / 1e9, 1)
        print(f"  {name}: {med:.4f} s", file=sys.stderr, flush=True)

    def backbone(p, b):
        return module.apply({"params": p}, b["tokens_BT"], positions_from_mask(b["valid_BT"]), return_hidden=True)

    record("backbone forward", jax.jit(backbone), params, batch, fl=fwd_fl.layers + fwd_fl.attention)
    hidden = jax.jit(backbone)(params, batch)
    cot = jax.random.normal(jax.random.PRNGKey(0), hidden.shape, hidden.dtype)
    record("backbone forward+backward", jax.jit(jax.grad(lambda p, b: jnp.vdot(backbone(p, b), cot))), params, batch,
           fl=3 * (fwd_fl.layers + fwd_fl.attention))

    def vocab(h, emb, b):
        return losses.response_logps(h, emb, b["target_idx_BR"], b["targets_BR"], b["target_mask_BR"], chunk=chunk,
                                     softcap=cfg.final_logit_softcap).logps_B.sum()

    emb = params["embedding"]
    record(f"vocabulary log-probs forward (chunk {chunk})", jax.jit(vocab), hidden, emb, batch, fl=fwd_fl.vocabulary)
    record(f"vocabulary log-probs forward+backward (chunk {chunk})", jax.jit(jax.grad(vocab, argnums=(0, 1))),
           hidden, emb, batch, fl=3 * fwd_fl.vocabulary)
    for c in args.chunks:
        if c != chunk:
            def vocab_c(h, e, b, c=c):
                return losses.response_logps(h, e, b["target_idx_BR"], b["targets_BR"], b["target_mask_BR"], chunk=c,
                                             softcap=cfg.final_logit_softcap).logps_B.sum()
            record(f"vocabulary log-probs forward+backward (chunk {c})", jax.jit(jax.grad(vocab_c, argnums=(0, 1))),
                   hidden, emb, batch, fl=3 * fwd_fl.vocabulary)

    loss_fn = steplib.make_loss_fn(module, method, config)
    totals = objectives.totals(objectives.get(method, config), batch)
    trainable = s["state"]["params"]
    ref = ref_tree if s["on_the_fly"] else None
    record("loss forward (= reference pass)", jax.jit(lambda p, b: loss_fn(p, b, ref, totals, frozen)[0]), trainable,
           batch, fl=fwd_fl.total * (2 if ref is not None else 1))
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, ref, totals, frozen)[0]))
    record("loss forward+backward", grad_fn, trainable, batch,
           fl=3 * fwd_fl.total + (fwd_fl.total if ref is not None else 0))
    grads = grad_fn(trainable, batch)[1]
    tx = s["tx"]

    def update(state, g):
        p, o, _ = tx.apply(g, state["opt_state"], state["params"])
        return {"params": p, "opt_state": o, "step": state["step"] + 1}

    opt_state = jax.jit(lambda p: {"params": jax.tree.map(jnp.copy, p), "opt_state": tx.init(p),
                                   "step": jnp.zeros((), jnp.int32)})(trainable)
    upd = jax.jit(update, donate_argnums=(0,))
    opt_state = jax.block_until_ready(upd(opt_state, grads))  # compile + a first run, not timed
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        opt_state = jax.block_until_ready(upd(opt_state, grads))
        ts.append(time.perf_counter() - t)
    parts["optimizer update (clip + AdamW)"] = {"median_s": round(statistics.median(ts), 4)}
    del opt_state, grads, params, trainable

    state = s["state"]
    compiled = s["step_fn"].lower(state, batch, ref_tree, frozen).compile()
    state, m = compiled(state, batch, ref_tree, frozen)
    jax.block_until_ready(m)
    ts = []
    trace = args.trace
    if trace:
        jax.profiler.start_trace(str(trace))
    for i in range(reps):
        t = time.perf_counter()
        state, m = compiled(state, s["batches"][1 + i], ref_tree, frozen)
        jax.block_until_ready((state, m))
        ts.append(time.perf_counter() - t)
    if trace:
        jax.profiler.stop_trace()
        trace_ops = trace_summary(trace)
    step = flops.train_step_flops(cfg, method=method, batch=BATCH, prompt_len=PROMPT_LEN, response_len=RESPONSE_LEN,
                                  reference=reference or "precomputed")
    parts["full train step"] = {"xla_temp_MiB": round(compiled.memory_analysis().temp_size_in_bytes / 2**20)}
    parts["full train step"].update(median_s=round(statistics.median(ts), 4), gflops=round(step.model / 1e9, 1),
                                    gflop_per_s=round(step.model / statistics.median(ts) / 1e9, 1))
    return {"method": method, "reference": reference, "logprob_chunk": chunk, "remat": config.remat,
            "overrides": parse_overrides(args.set), "reps": reps, "parts": parts,
            "flops_forward": fwd_fl.as_dict(), "trace": trace_ops if trace else None}


def trace_summary(trace_dir: Path, top: int = 12) -> dict:
    """XLA op time by kind (the fusion names without their numbers) in the newest trace under trace_dir,
    summed over the runtime's worker threads: where a step's time goes, op by op."""
    import collections
    import re

    import jax

    files = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    if not files:
        return {}
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    kinds: collections.Counter = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for e in line.events:
                name = e.name
                if name.startswith(("ThunkExecutor", "Slinky", "end:", "Threadpool", "Wait", "$")):
                    continue
                kinds[re.sub(r"\.\d+$", "", name)] += e.duration_ns
    total = sum(kinds.values())
    return {"file": str(files[-1]), "op_seconds_total": round(total / 1e9, 3),
            "by_kind": [{"kind": k, "s": round(v / 1e9, 3), "share": round(v / total, 3)}
                        for k, v in kinds.most_common(top)]}


def profile_table(result: dict) -> str:
    lines = ["| part | median s | GFLOP | GFLOP/s |", "| --- | --- | --- | --- |"]
    for name, p in result["parts"].items():
        lines.append(f"| {name} | {p['median_s']} | {p.get('gflops', '')} | {p.get('gflop_per_s', '')} |")
    if result.get("trace"):
        lines += ["", "| XLA op kind (trace of the full steps) | s | share |", "| --- | --- | --- |"]
        for k in result["trace"]["by_kind"]:
            lines.append(f"| {k['kind']} | {k['s']} | {k['share']:.1%} |")
    return "\n".join(lines)


# ---- MFU on an accelerator -----------------------------------------------------------------------------

# Dense bf16 matmul peaks from the vendors' datasheets (TFLOP/s), for the MFU convention; the measured
# matmul rate of the same run is reported beside them.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0,
                         "TPU v4": 275.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def bench_mfu(args) -> dict:
    """kwjax train steps of a (by default randomly initialised) Gemma 3 1B in bf16 on the first device:
    seconds per step, model FLOPs per step (kwjax.flops) and their fraction of the device's measured
    matmul rate and of its datasheet peak. Same workload shape as `train` (48 + 96 tokens)."""
    import jax

    from kwjax import flops
    from kwjax.paths import embedded_gguf_path
    from kwjax.tokenizer import load_tokenizer

    method = args.method
    reference = None if method == "sft" else (args.reference or "precomputed")
    total = args.warmup + args.steps
    workload = build_workload(load_tokenizer(embedded_gguf_path()), total * args.batch)
    s = kwjax_setup(method, reference, total, workload, args.dtype, model=args.model, batch=args.batch,
                    compute_dtype=args.compute_dtype, overrides=parse_overrides(args.set))
    state, ref_tree, frozen, batches = s["state"], s["ref_tree"], s["frozen"], s["batches"]
    t = time.perf_counter()
    compiled = s["step_fn"].lower(state, batches[0], ref_tree, frozen).compile()
    compile_s = time.perf_counter() - t
    times = []
    for i in range(total):
        t = time.perf_counter()
        state, metrics = compiled(state, batches[i], ref_tree, frozen)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[args.warmup:])
    fl = flops.train_step_flops(s["model_config"], method=method, batch=args.batch, prompt_len=PROMPT_LEN,
                                response_len=RESPONSE_LEN, reference=reference or "precomputed",
                                remat=s["config"].remat)
    device = jax.devices()[0].device_kind
    mm_dtype = args.compute_dtype or args.dtype
    rate = matmul_rate(args.matmul_n, 20, "bfloat16" if mm_dtype in ("bfloat16", "bf16") else "float32")
    out = {"model": args.model, "device": device, "dtype": args.dtype, "compute_dtype": args.compute_dtype or None,
           "method": method, "reference": reference, "batch": args.batch, "step_s_median": round(step_s, 4),
           "step_s": [round(x, 4) for x in times[args.warmup:]], "compile_s": round(compile_s, 1),
           "tokens_per_s": round(flops.tokens_per_step(method, args.batch, PROMPT_LEN, RESPONSE_LEN) / step_s, 1),
           "flops": fl.as_dict(), "model_tflops_per_s": round(fl.model / step_s / 1e12, 2), "matmul": rate,
           "fraction_of_measured_matmul_rate": round(fl.model / step_s / (rate["jax_gflops"] * 1e9), 3)}
    peak = args.peak_tflops or next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device), None)
    if peak and mm_dtype in ("bfloat16", "bf16"):
        out["peak_tflops"] = peak
        out["mfu"] = round(fl.model / step_s / (peak * 1e12), 4)
    return out


def bench_padding(args) -> dict:
    """How much of each batch is padding, per batching policy: real tokens / padded tokens over
    `--epochs` epochs of the shipped training split (the embedded tokenizer), and the distinct padded
    shapes (each one compile per stage). Counts only, no timing: the step time follows the tokens.

    `train_tflop`: the matmul FLOPs the recipe's stage executes on those batches (`kwjax.flops`, dense
    attention as computed): forward, backward for the activations and the body's weights, the vocabulary
    tiles recomputed (the embedding is frozen: no gradient of its own), and for DPO the reference pass
    once. Divided by a measured matmul rate it is the least time the stage's steps can take."""
    import runpy

    from kwjax import batching, feed, flops
    from kwjax.models.gemma3.config import PRESETS
    from kwjax.data import split_rows
    from kwjax.paths import embedded_gguf_path
    from kwjax.tokenizer import load_tokenizer

    recipe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "recipe_270m.py"))["get_config"]
    tok = load_tokenizer(embedded_gguf_path())
    model_config = PRESETS["gemma3-270m"]()
    rows = []
    # (kind as reported, data kind, preference file): the authored pairs, then the on-policy ones
    sets = (("sft", "sft", ""), ("dpo", "dpo", ""),
            ("dpo:onpolicy", "dpo", "kwjax/data_files/keyword_literature_onpolicy.jsonl"))
    for name, kind, preference_file in sets:
        c = recipe()
        c.data.preference_file = preference_file
        train_rows, _ = split_rows(c, kind)
        data = feed.encode(train_rows, tok, c, kind)
        lengths = data.lengths()
        for group in (0, 64, len(lengths)):
            for bucket in (16, 32, 64):
                real = padded = padded_resp = separate = executed = 0
                shapes = set()
                for epoch in range(args.epochs):
                    for idx in feed.epoch_batches(c.seed, epoch, lengths, c.batch_size, group):
                        batch = data.rows(idx, c.batch_size)
                        seq_len, resp_len = batching.padded_lengths(batch, bucket)
                        shapes.add((seq_len, resp_len))
                        padded += len(batch) * seq_len
                        padded_resp += len(batch) * resp_len
                        real += sum(len(r) for r in batch if r is not None)
                        fwd = flops.forward_flops(model_config, rows=len(batch), seq_len=seq_len,
                                                  logit_positions=resp_len).total
                        executed += 3 * fwd + (fwd if kind == "dpo" and epoch == 0 else 0)
                        if kind == "dpo":  # were chosen and rejected rows padded each to their own width
                            half = len(batch) // 2
                            separate += sum(half * batching.padded_lengths(part, bucket)[0]
                                            for part in (batch[:half], batch[half:]))
                row = {"kind": name, "group_by_length": group, "length_bucket": bucket,
                       "real_over_padded": round(real / padded, 3), "padded_tokens": padded,
                       "padded_response_tokens": padded_resp, "shapes": len(shapes),
                       "train_tflop": round(executed / 1e12, 1)}
                if separate:
                    row["halves_padded_separately_over_shared"] = round(separate / padded, 3)
                rows.append(row)
    for r in rows:
        halves = r.get("halves_padded_separately_over_shared")
        print(f"{r['kind']:12s} group {r['group_by_length']:4d} bucket {r['length_bucket']:3d}: real/padded "
              f"{r['real_over_padded']:.3f}, padded tokens {r['padded_tokens']}, shapes {r['shapes']}, "
              f"{r['train_tflop']} TFLOP"
              + (f", halves padded separately {halves:.3f}x" if halves else ""), file=sys.stderr)
    return {"epochs": args.epochs, "batch_size": c.batch_size, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sampling", "load", "train", "matmul", "profile", "mfu", "padding", "worker"])
    p.add_argument("--batch", type=int, default=None, help="mfu: examples or pairs (4); sampling: = --batches=N")
    p.add_argument("--batches", default="", help="sampling: prompts per batch, comma-separated (1,8,32,64)")
    p.add_argument("--modes", default="greedy,top_p", help="sampling: greedy and/or top_p (0.95, temperature 1)")
    p.add_argument("--no_peer", action="store_true", help="sampling: kwjax only (no transformers)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=None,
                   help="sampling: alternating runs (3); profile: timed calls per part (3); matmul: timed calls (20)")
    p.add_argument("--dtype", default=None,
                   help="parameter dtype: sampling, both sides (float32); matmul (float32); mfu (bfloat16)")
    p.add_argument("--out", "--output", dest="out", type=Path, help="write the JSON result here")
    # train
    p.add_argument("--steps", type=int, default=8, help="train: measured optimizer steps per process")
    p.add_argument("--warmup", type=int, default=2, help="train: steps run first and not measured")
    p.add_argument("--rounds", type=int, default=3, help="train: alternating kwjax/TRL rounds, fresh processes")
    p.add_argument("--frameworks", default="kwjax,trl")
    p.add_argument("--methods", default="sft,dpo")
    p.add_argument("--trl_gradient_checkpointing", action="store_true",
                   help="train: TRL with its own default gradient checkpointing (default off, like kwjax's remat)")
    p.add_argument("--baseline", default="", help="train: a checkout of an earlier kwjax; its kwjax cells run "
                   "beside this tree's, alternating (e.g. `git worktree add /tmp/base HEAD~1`)")
    p.add_argument("--no_matmul", action="store_true", help="train: skip the matmul-rate measurement")
    p.add_argument("--variants", default="", help='train: kwjax cells once per "NAME:KEY=VALUE,...;NAME2:..." '
                   "(config overrides, on top of --set), alternating within each round; ratios over the first")
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=5, help="padding: epochs of batches counted")
    # profile
    p.add_argument("--method", default="dpo", choices=["sft", "dpo"])
    p.add_argument("--reference", default="", help="dpo: precomputed (default) or on_the_fly")
    p.add_argument("--chunks", type=int, nargs="*", default=[32], help="profile: other logprob_chunk sizes to time")
    p.add_argument("--trace", type=Path, help="profile: write a jax.profiler trace of the full steps here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train (kwjax cells), profile, mfu: override a kwjax config field, e.g. --set remat=True "
                        "--set logprob_chunk=32")
    # mfu
    p.add_argument("--model", default="preset:gemma3-1b", help="mfu: a kwjax.load source or preset:NAME (random)")
    p.add_argument("--compute_dtype", default="", help="mfu: config.compute_dtype (mixed precision), e.g. bfloat16")
    p.add_argument("--peak_tflops", type=float, default=None, help="mfu: the device's peak (else a datasheet value)")
    # worker (internal: one train cell in a fresh process)
    p.add_argument("--framework", default="kwjax", choices=["kwjax", "trl"])
    p.add_argument("--workload", default="")
    p.add_argument("--hf_dir", default="")
    args = p.parse_args()
    if args.reps is None:
        args.reps = 20 if args.what == "matmul" else 3
    if args.what == "sampling" and not args.batches:
        args.batches = str(args.batch) if args.batch else "1,8,32,64"
    if args.batch is None:
        args.batch = 4 if args.what == "mfu" else 8
    if args.dtype is None:
        args.dtype = "bfloat16" if args.what == "mfu" else "float32"
    if args.what == "worker":
        bench_worker(args)
        return
    fn = {"sampling": bench_sampling, "load": bench_load, "train": bench_train, "matmul": bench_matmul,
          "profile": bench_profile, "mfu": bench_mfu, "padding": bench_padding}[args.what]
    from kwjax.cli import command_line

    result = {"machine": machine(), "command": command_line("scripts/bench.py", sys.argv[1:]),
              args.what: fn(args)}
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.what == "train":
        print("\n" + train_table(result["train"]))
    elif args.what == "profile":
        print("\n" + profile_table(result["profile"]))
    elif args.what == "sampling":
        print("\n" + sampling_table(result["sampling"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
