"""LoRA: B = 0 is exactly the base model, training moves the adapters only, the exported merged model
equals the adapter model, the reference is the base with adapters off, and bad settings are named."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwjax
from kwjax import lora, partition, stages
from kwjax import train as T
from kwjax.checkpoint import Checkpointer
from kwjax.models.gemma3.model import positions_from_mask
from kwjax.prepare import prepare
from tests.conftest import assert_refused_before_any_work, compiled_flops, tiny_config

LORA = {"lora.rank": 4, "lora.alpha": 8.0}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))


def logits(module, params, batch):
    return np.asarray(module.apply({"params": params}, batch["tokens_BT"], positions_from_mask(batch["valid_BT"])))


def numpy_merge(base: dict, adapters: dict, scale: float) -> dict:
    """W + scale · A B in float64 numpy, independent of kwjax.lora.combine."""
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
    for layer, blocks in adapters.items():
        for block, names in blocks.items():
            for name, ab in names.items():
                w = out[layer][block][name]
                a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
                out[layer][block][name] = w + scale * (a @ b).reshape(w.shape)
    return out


def test_zero_b_is_exactly_the_base_model():
    cfg = tiny_config(**LORA)
    model = stages.load_model(cfg)
    part = partition.from_config(cfg)
    assert isinstance(part, lora.LoRA) and part.scale == 2.0
    adapters, frozen = part.split(model.params)
    q = adapters["layer_0"]["attn"]["q"]
    d, n, h = model.params["layer_0"]["attn"]["q"].shape
    assert q["a"].shape == (d, 4) and q["b"].shape == (4, n * h) and not q["b"].any() and q["a"].any()
    assert adapters["layer_0"]["attn"]["o"]["a"].shape == (n * h, 4)  # o's input is [N, H]
    batch = prepare(cfg, "sft", stages.load_model(cfg)).train_batch(0)
    np.testing.assert_array_equal(logits(model.module, part.combine(adapters, frozen), batch),
                                  logits(model.module, model.params, batch))


def _random_b(adapters: dict, seed: int = 1) -> dict:
    """The adapters with B drawn at random (as after training), so (x A) B is far from zero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (rng.normal(0, 0.05, x.shape).astype(x.dtype) if jax.tree_util.keystr(p).endswith("['b']")
                      else x), adapters)


def _sft_loss_through(part, module, cfg, frozen, batch):
    """The step's SFT loss as a function of the adapters, with `part`'s way of applying them."""
    from kwjax import objectives
    from kwjax import step as steplib

    loss_fn = steplib.make_loss_fn(module, "sft", cfg, part)
    totals = objectives.totals(objectives.get("sft", cfg), batch)
    return lambda adapters: loss_fn(adapters, batch, None, totals, frozen)[0]


class _Merged(lora.LoRA):
    """LoRA as it was applied before 2026-12-08: W + (α/r)·A B formed first (`combine`), the definition."""

    def forward_trees(self, trainable, frozen):
        return self.combine(trainable, frozen), None


@pytest.mark.parametrize("remat", [False, True])
def test_adapters_kept_apart_give_the_merged_weights_gradients_without_the_weights_own(remat):
    """Loss and adapter gradients equal those through W + (α/r)·A B; and XLA's FLOP count of the compiled
    gradient shows what keeping them apart saves: the target weights' own gradients (2·tokens·in·out
    each), less what the adapters' matmuls add (6·tokens·r·(in + out) each; 8 with layers recomputed),
    to within 10 %."""
    cfg = tiny_config(remat=remat, **LORA)
    run = prepare(cfg, "sft", stages.load_model(cfg))
    assert run.module.remat == remat  # the module as training builds it
    part = partition.from_config(cfg)
    adapters, frozen = part.split(stages.load_model(cfg).params)
    adapters = _random_b(adapters)
    batch = run.train_batch(0)
    merged = _Merged(part.rank, part.alpha, part.targets)

    def compiled(p):
        return jax.jit(jax.value_and_grad(_sft_loss_through(p, run.module, cfg, frozen, batch))).lower(
            adapters).compile()

    apart, want = compiled(part), compiled(merged)
    (apart_loss, apart_grads), (want_loss, want_grads) = apart(adapters), want(adapters)
    assert abs(float(apart_loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    assert float(jnp.abs(apart_grads["layer_1"]["mlp"]["down"]["a"]).max()) > 1e-4  # B != 0: A has a gradient
    chex.assert_trees_all_close(apart_grads, want_grads, atol=1e-6, rtol=1e-4)

    tokens = batch["tokens_BT"].size
    targets = jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, dict) and "a" in x)
    weight_grads = sum(2 * tokens * ab["a"].shape[0] * ab["b"].shape[1] for ab in targets)
    per = 8 if remat else 6
    adapter_matmuls = sum(per * tokens * part.rank * (ab["a"].shape[0] + ab["b"].shape[1]) for ab in targets)
    assert compiled_flops(want) - compiled_flops(apart) > 0.9 * (weight_grads - adapter_matmuls) > 0


def test_training_moves_only_the_adapters_and_the_export_is_the_merged_model(tmp_path):
    cfg = tiny_config(max_steps=2, export_hf=True, **LORA)
    start = jax.tree.map(np.asarray, stages.load_model(cfg).params)
    run = prepare(cfg, "sft", stages.load_model(cfg))
    assert set(jax.tree.leaves(jax.tree_util.tree_map_with_path(
        lambda p, _: jax.tree_util.keystr(p)[-5:], run.state["params"]))) == {"['a']", "['b']"}
    for got, want in zip(jax.tree.leaves(run.frozen), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(got), want)
    batch = jax.tree.map(np.asarray, run.train_batch(0))
    del run

    summary = stages.run(cfg, "sft", tmp_path / "run", progress=False)
    assert summary["sft"]["final_step"] == 2
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    restored = ckpt.manager.restore(ckpt.latest_step())["state"]["params"]
    ckpt.close()
    assert set(restored) == {f"layer_{i}" for i in range(3)}  # adapters only: no embedding, no norms
    b = np.asarray(restored["layer_0"]["mlp"]["down"]["b"])
    assert np.abs(b).max() > 1e-6  # B left zero: the adapters trained

    merged = numpy_merge(start, restored, 8.0 / 4)
    exported = kwjax.load(tmp_path / "run" / "model")
    for sub in ("model", "hf"):
        back = kwjax.load(tmp_path / "run" / sub)
        chex.assert_trees_all_close(jax.tree.map(np.asarray, back.params), merged, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(logits(exported.module, exported.params, batch),
                               logits(exported.module, jax.tree.map(jnp.float32, merged), batch), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(exported.params["embedding"]), start["embedding"])


def test_the_reference_is_the_base_with_adapters_off(tmp_path):
    fly = tiny_config(max_steps=2, **LORA, **{"dpo.reference": "on_the_fly"})
    run = prepare(fly, "dpo", stages.load_model(fly))
    assert run.ref == {}  # nothing laid over the frozen base: no copy, no pass
    del run
    a = T.train(tiny_config(max_steps=2, **LORA), "dpo", tmp_path / "pre", stages.load_model(fly), progress=False)
    b = T.train(fly, "dpo", tmp_path / "fly", stages.load_model(fly), progress=False)
    la, lb = ([m["loss"] for m in r.metrics if "loss" in m] for r in (a, b))
    assert abs(la[0] - np.log(2)) < 1e-5
    chex.assert_trees_all_close(la, lb, atol=1e-5)


def test_sft_dpo_with_lora_starts_dpo_from_the_merged_sft_model(tmp_path):
    cfg = tiny_config(max_steps=2, **LORA)
    summary = stages.run(cfg, "sft_dpo", tmp_path, progress=False)
    assert summary["dpo"]["final_step"] == 2
    first = [m for m in metrics_of(tmp_path / "dpo") if "loss" in m][0]
    assert abs(first["loss"] - np.log(2)) < 1e-5 and abs(first["rewards/margins"]) < 1e-5
    sft = kwjax.load(tmp_path / "sft" / "model")
    base = stages.load_model(cfg)
    assert not np.array_equal(np.asarray(sft.params["layer_0"]["attn"]["q"]),
                              np.asarray(base.params["layer_0"]["attn"]["q"]))


def metrics_of(workdir):
    import json

    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides, message", [
    ({"lora.rank": -2}, "lora.rank is -2; expected a positive rank, or 0 for full fine-tuning"),
    ({"lora.rank": 4, "lora.targets": "q,query"}, "lora.targets: unknown ['query']; expected some of q, k, v"),
    ({"lora.rank": 4, "lora.dropout": 0.1}, "lora.dropout is 0.1"),
    ({"lora.rank": 4, "freeze": "embedding"}, "freeze and lora.rank > 0 both set"),
    ({"lora.rank": 100}, "lora.rank 100 is larger than a target weight's smaller side"),
])
def test_bad_lora_settings_are_named_before_any_work(overrides, message, tmp_path):
    assert_refused_before_any_work(overrides, re.escape(message), tmp_path)


def test_resuming_a_lora_run_without_lora_is_refused(tmp_path):
    cfg = tiny_config(checkpoint_every=1, **LORA)
    T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False, interrupt_at=1)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(T.TrainingError, match=r"trained with LoRA \(lora.rank=4.*this run has full fine-tuning"):
        T.train(tiny_config(checkpoint_every=1), "sft", tmp_path, stages.load_model(cfg), progress=False,
                resume=True)
    with pytest.raises(T.TrainingError, match=r"lora.rank=4.*this run has LoRA \(lora.rank=2"):
        T.train(tiny_config(checkpoint_every=1, **{"lora.rank": 2}), "sft", tmp_path, stages.load_model(cfg),
                progress=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False, resume=True).final_step == 3
