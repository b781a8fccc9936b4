"""The whole experiment: train SFT, DPO and SFT→DPO from one base, evaluate all four, over seeds, report.

Layout under the workdir (every piece is reused when a rerun finds it finished, so an interrupted
experiment continues where it stopped):

  seed_<s>/train/<method>/   training runs (checkpoints, metrics.jsonl, model/)
  seed_<s>/eval/<model>/     metrics.json, samples.jsonl, likelihoods.jsonl
  experiment.json            the config, the task list with wall times, the machine
  report/                    report.md and its PNG plots (kwjax.report)

SFT→DPO reuses the seed's SFT run as its starting point and its reference, as the write-up did, so
the SFT stage is trained once per seed, not twice. Each finished piece records a fingerprint of the
settings that produced it; a rerun with different settings stops with an error instead of mixing
results from two configurations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import jax

from kwjax import compiles
from kwjax import data as datalib
from kwjax import evaluate as evallib
from kwjax import memory
from kwjax import report as reportlib
from kwjax import stages
from kwjax.files import atomic_write_text
from kwjax.fingerprint import digest_json
from kwjax.runs import read_marker, write_marker

log = logging.getLogger(__name__)


class ExperimentError(RuntimeError):
    """An experiment that cannot go on: a workdir holding results from other settings, a bad config."""


@dataclasses.dataclass
class Task:
    kind: str  # "train" or "eval"
    model: str  # a method for train; a MODELS entry for eval
    seed: int
    path: Path
    seconds: float | None = None
    peak_rss_mib: float | None = None  # the process's peak resident memory during the task
    reused: bool = False
    timings: dict | None = None  # wall seconds by phase (load, prepare, compile, steps, evaluation, save, ...)


def seed_config(config, seed: int):
    c = copy.deepcopy(config)
    c.seed = seed
    return c


def train_fingerprint(config, method: str) -> str:
    """What decides a training run's result: everything but evaluation and report settings."""
    d = json.loads(config.to_json_best_effort())
    for key in ("eval", "experiment", "checkpoint_every", "keep_checkpoints", "log_every", "export_hf"):
        d.pop(key, None)
    if method != "sft_dpo":  # one stage does not depend on the other stage's settings
        d.pop("dpo" if method == "sft" else "sft", None)
    # Fields added later, at values that change nothing: dropped, so earlier workdirs stay valid.
    if not d.get("freeze"):
        d.pop("freeze", None)
    if not str(d.get("train_tokens", "")).strip():
        d.pop("train_tokens", None)
    if not d.get("lora", {}).get("rank"):
        d.pop("lora", None)
    d.pop("logprob_keep_logits", None)  # a speed/memory trade, same log-probs either way
    if not d.get("data", {}).get("group_by_length"):
        d.get("data", {}).pop("group_by_length", None)
    if method == "sft" or not d.get("data", {}).get("preference_file"):
        d.get("data", {}).pop("preference_file", None)  # SFT never reads it
    if "dpo" in d and d["dpo"].get("loss_type") != "simpo":
        d["dpo"].pop("simpo_gamma", None)
    return digest_json({"method": method, "config": d})


def eval_fingerprint(config, model: str) -> str:
    d = json.loads(config.to_json_best_effort())
    rows = {"eval_file": d["data"]["eval_file"]} if d["data"].get("eval_file") else {}  # other prompts
    return digest_json({"model": model, "eval": d["eval"], "train": None if model == "base" else
                        train_fingerprint(config, model), "base": d["model"], "seed": d["seed"],
                        "max_length": d["data"]["max_length"], **rows})


def _check_done(task: Task, fingerprint: str) -> bool:
    """True if the task's directory holds its finished result; False if none or unfinished (started with
    these settings: training resumes from its checkpoint); an error if made with other settings."""
    found = read_marker(task.path)
    if found is None:
        return False
    if found.get("fingerprint") != fingerprint:
        raise ExperimentError(f"{task.path} holds results made with other settings (fingerprint "
                              f"{found.get('fingerprint')}, now {fingerprint}); use a new --workdir, or delete "
                              f"{task.path} to redo it")
    if found.get("finished"):
        task.reused, task.seconds, task.peak_rss_mib = True, found.get("seconds"), found.get("peak_rss_mib")
        task.timings = found.get("timings")
    return bool(found.get("finished"))


def _mark(task: Task, fingerprint: str, finished: bool, **extra) -> None:
    write_marker(task.path, fingerprint, finished, **extra)


def eval_settings(config) -> evallib.EvalSettings:
    e = config.eval
    return evallib.EvalSettings(max_new_tokens=e.max_new_tokens, num_samples=e.num_samples,
                                temperature=e.temperature, top_p=e.top_p, seed=config.seed,
                                batch_size=e.batch_size, max_length=config.data.max_length)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "devices": f"{len(devices)} × {devices[0].device_kind}", "jax": jax.__version__,
            "python": platform.python_version()}


def plan(config, workdir: Path) -> list[Task]:
    tasks = []
    methods = list(config.experiment.methods)
    unknown = [m for m in methods if m not in stages.METHODS]
    if unknown:
        raise ExperimentError(f"experiment.methods: unknown {unknown}; expected some of {stages.METHODS}")
    for seed in config.experiment.seeds:
        root = workdir / f"seed_{seed}"
        tasks.append(Task("eval", "base", seed, root / "eval" / "base"))
        for m in methods:
            if m == "sft_dpo" and "sft" not in methods:
                tasks.append(Task("train", "sft", seed, root / "train" / "sft"))
            tasks.append(Task("train", m, seed, root / "train" / m))
            tasks.append(Task("eval", m, seed, root / "eval" / m))
    return tasks


def _run_task(task: Task, fingerprint: str, work: Callable[[float], tuple[dict, dict]]) -> None:
    """Runs `work(start time) -> (marker fields, timings by phase)` unless the task is already done with
    these settings; marks it started, then finished with its wall seconds, peak memory and compile counts."""
    if _check_done(task, fingerprint):
        return
    _mark(task, fingerprint, finished=False)
    t0 = time.time()
    memory.reset_peak()
    compiled = compiles.Counter.start()
    fields, timings = work(t0)
    _mark(task, fingerprint, finished=True, seconds=round(time.time() - t0, 1), peak_rss_mib=memory.peak_mib(),
          timings={**timings, **compiled.as_timings()}, **fields)


def _train(task: Task, config, workdir_seed: Path, progress: bool) -> None:
    method = task.model

    def work(t0: float) -> tuple[dict, dict]:
        # sft_dpo: DPO from this seed's finished SFT model, which is also its reference (as in the write-up)
        chain = stages.experiment_layout(method, workdir_seed / "train")
        summary = stages.run_chain(config, chain, resume=True, progress=progress)[chain[-1].method]
        if summary.get("interrupted"):
            raise KeyboardInterrupt(f"training {method} (seed {config.seed}) stopped by a signal; its checkpoint "
                                    "is saved and a rerun of the experiment resumes it")
        return {"final_step": summary["final_step"]}, summary.get("timings") or {}

    _run_task(task, train_fingerprint(config, method), work)


def _evaluate(task: Task, config, workdir_seed: Path, rows: list[dict], progress: bool) -> None:
    import kwjax

    def work(t0: float) -> tuple[dict, dict]:
        if task.model == "base":
            model = stages.load_model(config)
        else:
            model = kwjax.load(workdir_seed / "train" / task.model / "model", dtype=config.dtype)
        loaded = round(time.time() - t0, 2)
        result = evallib.evaluate(model, rows, eval_settings(config), task.path, progress=progress,
                                  run=str(config.seed))
        return {}, {"load": loaded, **result.get("timings", {})}

    _run_task(task, eval_fingerprint(config, task.model), work)


def run(config, workdir: str | Path, *, progress: bool = True, report_dir: str | Path | None = None,
        on_task: Callable[[int, int, Task], None] | None = None, command: str | None = None) -> Path:
    """Runs (or finishes) every task, then writes the report; returns the report's path.

    `command`: the command line that ran it, recorded in experiment.json and quoted by the report as
    the way to reproduce it (flags and all); the last invocation's is kept."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = datalib.validation_rows(config, "dpo", config.eval.limit)
    if not rows:
        raise ExperimentError("no evaluation rows (eval.limit or the eval file left none)")
    tasks = plan(config, workdir)
    started = time.time()
    record_path = workdir / "experiment.json"
    for i, task in enumerate(tasks, 1):
        if on_task is not None:
            on_task(i, len(tasks), task)
        c = seed_config(config, task.seed)
        root = workdir / f"seed_{task.seed}"
        if task.kind == "train":
            _train(task, c, root, progress)
        else:
            _evaluate(task, c, root, rows, progress)
        if not task.reused:
            done = read_marker(task.path)
            task.seconds, task.peak_rss_mib = float(done["seconds"]), done.get("peak_rss_mib")
            task.timings = done.get("timings")
        _write_record(record_path, config, tasks, started, command)
    record = _write_record(record_path, config, tasks, started, command)
    out = Path(report_dir) if report_dir else workdir / "report"
    return reportlib.write(config, workdir, tasks, rows, out, record)


def _write_record(path: Path, config, tasks: list[Task], started: float, command: str | None = None) -> dict:
    previous = json.loads(path.read_text()) if path.is_file() else {}
    record = {
        "command": command or previous.get("command"),
        "config": json.loads(config.to_json_best_effort()),
        "machine": previous.get("machine") or machine(),
        "tasks": [{"kind": t.kind, "model": t.model, "seed": t.seed, "path": str(t.path), "seconds": t.seconds,
                   "peak_rss_mib": t.peak_rss_mib, "reused": t.reused, "timings": t.timings} for t in tasks],
        "wall_seconds_this_invocation": round(time.time() - started, 1),
    }
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False))
    return record
