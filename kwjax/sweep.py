"""A small recorded sweep: the same training run over a grid of config values, one table of results.

Each point is an ordinary training run (`kwjax.stages.run`) in WORKDIR/<point>, so a point can be
inspected, resumed or reused like any run; a finished point (its model written) is not trained again.
The table takes every point's last logged value of each metric (eval loss, preference accuracy, and
the per-epoch generation checks `gen_*` when `eval.every_epoch` is set), so the choice of learning
rate, β or rank is read from numbers, not guessed.
"""

from __future__ import annotations

import ast
import copy
import itertools
import json
import math
from pathlib import Path

from kwjax.files import atomic_write_text


class SweepError(ValueError):
    """A grid that names no values, or a field the config does not have."""


def parse_grid(items: list[str]) -> dict[str, list]:
    """["sft.learning_rate=1e-5,3e-5", "lora.rank=8,16"] -> {"sft.learning_rate": [1e-5, 3e-5], ...}."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise SweepError(f"--grid {item!r}: expected KEY=VALUE[,VALUE...]")
        parsed = []
        for v in values.split(","):
            try:
                parsed.append(ast.literal_eval(v.strip()))
            except (ValueError, SyntaxError):
                parsed.append(v.strip())
        grid[key.strip()] = parsed
    if not grid:
        raise SweepError("the grid is empty: pass at least one --grid KEY=VALUE,VALUE")
    return grid


def set_field(config, key: str, value) -> None:
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        if p not in node:
            raise SweepError(f"--grid {key}: the config has no field {p!r}")
        node = node[p]
    if leaf not in node:
        raise SweepError(f"--grid {key}: the config has no field {key!r}")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    node[leaf] = value


def points(config, grid: dict[str, list]) -> list[tuple[str, dict, object]]:
    """(name, values, config) per grid point, in the grid's order; names are filesystem-safe."""
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        c = copy.deepcopy(config)
        for k, v in values.items():
            set_field(c, k, v)
        name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()).replace("/", "-")
        out.append((name, values, c))
    return out


def last_values(metrics_path: Path) -> dict:
    """Each metric's last logged value (the end of the run), and the step it was logged at."""
    last: dict = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    last[k] = v
    return last


TABLE_COLUMNS = ("loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_preference_accuracy",
                 "gen_terminated", "gen_prompt_echo", "gen_all_keywords_morpheme", "gen_seq_rep_4", "gen_length_chars",
                 "tokens_per_second")


def table(rows: list[dict]) -> str:
    cols = [c for c in TABLE_COLUMNS if any(c in r["last"] for r in rows)]
    lines = ["| point | " + " | ".join(cols) + " | minutes |", "| --- " * (len(cols) + 2) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r["last"].get(c)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}")
        lines.append(f"| {r['point']} | " + " | ".join(cells) + f" | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def best(results: list[dict], metric: str) -> dict:
    """The point with the best last value of `metric`: lowest for losses (names holding "loss" or
    "rep"/"echo"), highest otherwise. Points that never logged it are skipped."""
    lower = any(w in metric for w in ("loss", "rep", "echo"))
    scored = [r for r in results if isinstance(r["last"].get(metric), (int, float))
              and not math.isnan(r["last"][metric])]
    if not scored:
        raise SweepError(f"no sweep point logged {metric!r}; logged: {sorted({k for r in results for k in r['last']})}")
    return (min if lower else max)(scored, key=lambda r: r["last"][metric])


def run(config, method: str, grid: dict[str, list], workdir: str | Path, *, progress: bool = True,
        on_point=None) -> list[dict]:
    """Trains every grid point (reusing finished ones), then writes WORKDIR/sweep.jsonl and sweep.md."""
    import time

    from kwjax import stages

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (name, values, c) in enumerate(points(config, grid), 1):
        if on_point is not None:
            on_point(i, name)
        point_dir = workdir / name
        record = point_dir / "sweep_point.json"
        if record.is_file():
            results.append(json.loads(record.read_text()))
            continue
        started = time.time()
        summary = stages.run(c, method, point_dir, resume=True, progress=progress)
        if any(s.get("interrupted") for s in summary.values()):
            raise KeyboardInterrupt(f"sweep point {name} stopped by a signal; rerun the sweep to resume it")
        last_stage = point_dir / method if method == "sft_dpo" else point_dir
        entry = {"point": name, "values": values, "method": method, "seconds": round(time.time() - started, 1),
                 "last": last_values(last_stage / "metrics.jsonl"),
                 "timings": {m: s.get("timings") for m, s in summary.items()}}
        atomic_write_text(record, json.dumps(entry, indent=2))
        results.append(entry)
    atomic_write_text(workdir / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write_text(workdir / "sweep.md", f"# Sweep: {method}, {len(results)} points\n\n" + table(results) + "\n")
    return results
