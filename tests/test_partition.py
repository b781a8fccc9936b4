"""The trainable/frozen seam: split and merge, frozen weights untouched by training, the optimizer and
checkpoints holding the trainable tree only, and a frozen-embedding SFT step checked against optax."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kwjax import partition, stages
from kwjax import train as T
from kwjax.models.gemma3.model import positions_from_mask
from kwjax.prepare import prepare
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))


def test_split_and_merge_by_hand():
    a, b, c, d = (np.full(2, i) for i in range(4))
    params = {"embedding": a, "layer_0": {"attn": {"q": b, "k": c}, "mlp": {"up": d}}}
    part = partition.Partition(("embedding", "attn/q$"))
    trainable, frozen = part.split(params)
    assert trainable == {"layer_0": {"attn": {"k": c}, "mlp": {"up": d}}}
    assert frozen == {"embedding": a, "layer_0": {"attn": {"q": b}}}
    assert trainable["layer_0"]["attn"]["k"] is c  # the same arrays, not copies
    merged = partition.merge(frozen, trainable)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(x is y for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    # a later tree wins: a full reference tree laid over the frozen one replaces it everywhere
    other = jax.tree.map(lambda x: x + 10, params)
    assert all(x is y for x, y in zip(jax.tree.leaves(partition.merge(frozen, other)), jax.tree.leaves(other)))
    assert partition.Partition().split(params) == (params, {})


def test_bad_freeze_settings_are_named():
    params = {"embedding": np.zeros(2), "final_norm": {"scale": np.zeros(2)}}
    with pytest.raises(partition.PartitionError, match="'embeding' matches no parameter"):
        partition.Partition(("embeding",)).check(params)
    with pytest.raises(partition.PartitionError, match="freezes every parameter"):
        partition.Partition((".*",)).check(params)
    with pytest.raises(partition.PartitionError, match="not a regular expression"):
        partition.from_config(tiny_config(freeze="layer_(0"))
    assert partition.from_config(tiny_config(freeze=" embedding , attn/q$ ")).frozen_patterns == ("embedding",
                                                                                                  "attn/q$")


def _reference_sft_loss(module, params, batch):
    """Mean NLL over response tokens from full logits (no tiling, no kwjax loss code)."""
    logits = module.apply({"params": params}, batch["tokens_BT"], positions_from_mask(batch["valid_BT"]))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    rows = jnp.arange(logp.shape[0])[:, None]
    picked = logp[rows, batch["target_idx_BR"], batch["targets_BR"]]
    mask = batch["target_mask_BR"].astype(jnp.float32)
    return -(picked * mask).sum() / mask.sum()


def test_frozen_embedding_step_equals_optax_on_the_other_parameters(tmp_path):
    """One SFT step with `freeze=embedding`: the embedding is bitwise the starting one, the optimizer
    holds no moments for it, and every other parameter equals optax's clipped AdamW step on the
    gradient of a full-logit loss taken with respect to those parameters alone."""
    # eps 1e-3: Adam's first step is g / (|g| + eps); a tiny eps turns float noise on near-zero
    # gradients (tiled vs full-logit log-softmax) into whole-learning-rate differences
    cfg = tiny_config(freeze="embedding", max_steps=1, **{"optimizer.schedule": "constant",
                                                           "optimizer.weight_decay": 0.01, "optimizer.eps": 1e-3})
    model = stages.load_model(cfg)
    start = jax.tree.map(np.asarray, model.params)
    run = prepare(cfg, "sft", stages.load_model(cfg))
    assert set(run.frozen) == {"embedding"} and "embedding" not in run.state["params"]
    assert not any("embedding" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(run.state["opt_state"]))
    batch = run.train_batch(0)
    host_batch = jax.tree.map(np.asarray, batch)

    result = T.train(cfg, "sft", tmp_path / "run", model, progress=False)
    np.testing.assert_array_equal(np.asarray(result.params["embedding"]), start["embedding"])

    module = run.module
    emb = jnp.asarray(start["embedding"])
    rest = {k: v for k, v in start.items() if k != "embedding"}
    grads = jax.grad(lambda p: _reference_sft_loss(module, {**p, "embedding": emb}, host_batch))(rest)
    tx = optax.chain(optax.clip_by_global_norm(cfg.optimizer.clip_norm),
                     optax.adamw(cfg.sft.learning_rate, b1=cfg.optimizer.b1, b2=cfg.optimizer.b2,
                                 eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay,
                                 mask=jax.tree.map(lambda x: x.ndim >= 2, rest)))
    updates, _ = tx.update(grads, tx.init(rest), rest)
    want = optax.apply_updates(rest, updates)
    got = {k: v for k, v in result.params.items() if k != "embedding"}
    chex.assert_trees_all_close(got, want, atol=2e-6, rtol=1e-5)
    moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(rest)))
    assert moved > 1e-4  # the trainable parameters did change


def test_frozen_dpo_on_the_fly_equals_precomputed_without_copying_the_frozen_tree(tmp_path):
    fly_cfg = tiny_config(freeze="embedding", max_steps=2, **{"dpo.reference": "on_the_fly"})
    run = prepare(fly_cfg, "dpo", stages.load_model(fly_cfg))
    assert run.ref is not None and "embedding" not in run.ref  # the reference shares the frozen tree
    del run
    pre = T.train(tiny_config(freeze="embedding", max_steps=2), "dpo", tmp_path / "pre",
                  stages.load_model(fly_cfg), progress=False)
    fly = T.train(fly_cfg, "dpo", tmp_path / "fly", stages.load_model(fly_cfg), progress=False)
    losses = [[m["loss"] for m in r.metrics if "loss" in m] for r in (pre, fly)]
    assert abs(losses[0][0] - np.log(2)) < 1e-5
    chex.assert_trees_all_close(losses[0], losses[1], atol=1e-5)


def test_resume_with_another_freeze_is_refused_and_the_checkpoint_kept(tmp_path):
    cfg = tiny_config(freeze="embedding", checkpoint_every=1)
    T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False, interrupt_at=1)
    from kwjax.checkpoint import Checkpointer

    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(T.TrainingError, match="trained with freeze='embedding', this run has full fine-tuning"):
        T.train(tiny_config(checkpoint_every=1), "sft", tmp_path, stages.load_model(cfg), progress=False,
                resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 1
    ckpt.close()
    rest = T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False, resume=True)
    assert rest.final_step == 3


def test_a_freeze_that_names_nothing_stops_before_any_work(tmp_path):
    cfg = tiny_config(freeze="embeding")
    with pytest.raises(T.TrainingError, match="freeze: pattern 'embeding' matches no parameter"):
        T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False)
    assert not (tmp_path / "checkpoints").exists()
