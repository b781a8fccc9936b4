"""What a training run reports about itself: per-step time and tokens/s, wall time by phase, and the
per-epoch hook (greedy outputs after every epoch) — on the tiny random model."""

from __future__ import annotations

import json
import time

import chex
import jax
import numpy as np
import pytest

from kwjax import evaluate as evallib
from kwjax import stages
from kwjax import train as T
from kwjax.prepare import prepare
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_on_epoch_sees_every_epoch_with_the_current_params(tmp_path):
    cfg = tiny_config(epochs=2, max_steps=0, **{"data.train_limit": 8})  # 2 steps per epoch of 4
    seen = []

    def hook(epoch, step, params):
        seen.append((epoch, step, jax.tree.map(np.asarray, params)))
        return {"probe": 10.0 * epoch}

    result = T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False, on_epoch=hook)
    assert [(e, s) for e, s, _ in seen] == [(1, 2), (2, 4)]
    chex.assert_trees_all_close(seen[-1][2], jax.tree.map(np.asarray, result.params), atol=0, rtol=0)
    assert not np.allclose(seen[0][2]["layer_0"]["mlp"]["up"], seen[1][2]["layer_0"]["mlp"]["up"])
    logged = {m["step"]: m["probe"] for m in _metrics(tmp_path) if "probe" in m}
    assert logged == {2: 10.0, 4: 20.0}
    assert "eval_loss" in next(m for m in _metrics(tmp_path) if "probe" in m)  # with the eval split's metrics


def test_step_time_tokens_per_second_and_phase_timings(tmp_path):
    cfg = tiny_config(max_steps=3)
    started = time.perf_counter()
    result = T.train(cfg, "dpo", tmp_path, stages.load_model(cfg), progress=False)
    wall = time.perf_counter() - started
    steps = [m for m in _metrics(tmp_path) if "loss" in m]
    assert len(steps) == 3
    # tokens/s × s = the real (unpadded) tokens of that step's batch, counted here from the collated masks
    run = prepare(cfg, "dpo", stages.load_model(cfg))
    for i, m in enumerate(steps):
        real = int(np.asarray(jax.device_get(run.train_batch(i)["valid_BT"])).sum())
        assert m["step_seconds"] > 0
        np.testing.assert_allclose(m["tokens_per_second"] * m["step_seconds"], real, rtol=1e-6)
    t = result.timings
    assert set(t) == {"prepare", "compile", "steps", "evaluation", "save"}
    assert t["compile"] > 0 and all(v >= 0 for v in t.values())
    np.testing.assert_allclose(t["steps"], sum(m["step_seconds"] for m in steps), rtol=1e-3, atol=0.02)
    assert sum(t.values()) <= wall


def test_stage_epoch_hook_writes_greedy_outputs_of_that_epoch(tmp_path):
    cfg = tiny_config(epochs=2, max_steps=0, **{"data.train_limit": 8, "eval.every_epoch": 3,
                                                  "eval.max_new_tokens": 6})
    chain = stages.experiment_layout("sft", tmp_path / "train")
    summary = stages.run_chain(cfg, chain, progress=False)["sft"]
    assert set(summary["timings"]) >= {"load", "prepare", "compile", "steps", "evaluation", "save", "export"}
    directory = chain[0].directory
    for epoch in (1, 2):
        rows = [json.loads(x) for x in (directory / "epochs" / f"epoch_{epoch}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and {r["mode"] for r in rows} == {"greedy"}
    gen = [m for m in _metrics(directory) if "gen_terminated" in m]
    assert [m["step"] for m in gen] == [2, 4]
    assert all(0.0 <= m["gen_terminated"] <= 1.0 and 0.0 <= m["gen_prompt_echo"] <= 1.0 for m in gen)
    # the last epoch's outputs are the finished model's own: the hook ran on the current parameters
    import kwjax
    from kwjax import data as datalib

    model = kwjax.load(directory / "model")
    rows = datalib.validation_rows(cfg, "dpo", 3)
    fresh = evallib.generate(model, rows, evallib.EvalSettings(max_new_tokens=6, num_samples=0, batch_size=4),
                             progress=False)
    last = [json.loads(x) for x in (directory / "epochs" / "epoch_2.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in last] == [g.tokens for g in fresh]


def test_a_stages_own_every_epoch_wins_over_eval_every_epoch(tmp_path):
    cfg = tiny_config(**{"eval.every_epoch": 3, "dpo.every_epoch": 0})
    model = stages.load_model(cfg)
    sft, dpo = stages.experiment_layout("sft_dpo", tmp_path)
    assert (sft.method, dpo.method) == ("sft", "dpo")
    assert stages.epoch_hook(cfg, sft, model) is not None  # -1: as eval.every_epoch
    assert stages.epoch_hook(cfg, dpo, model) is None
    cfg.eval.every_epoch, cfg.dpo.every_epoch = 0, 2
    assert stages.epoch_hook(cfg, sft, model) is None and stages.epoch_hook(cfg, dpo, model) is not None
