"""Trained rows of a frozen embedding (kwjax.token_rows): untouched rows give back the model exactly,
the rows' gradient is the full embedding's gradient at those rows, training moves those rows and no
other, the export carries them, and bad settings are named before any work."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwjax
from kwjax import partition, stages, token_rows
from kwjax import train as T
from kwjax.checkpoint import Checkpointer
from kwjax.models.gemma3.model import positions_from_mask
from kwjax.prepare import prepare
from tests.conftest import assert_refused_before_any_work, tiny_config

ROWS = {"freeze": "embedding", "train_tokens": "<start_of_turn>,<end_of_turn>"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))


def test_untouched_rows_are_exactly_the_model():
    cfg = tiny_config(**ROWS)
    model = stages.load_model(cfg)
    part = partition.from_config(cfg, model.tokenizer)
    ids = [model.tokenizer.start_of_turn_id, model.tokenizer.end_of_turn_id]
    assert isinstance(part, token_rows.TokenRows) and list(part.ids) == ids
    trainable, frozen = part.split(model.params)
    assert "embedding" not in trainable and "embedding" in frozen
    np.testing.assert_array_equal(trainable["token_rows"], np.asarray(model.params["embedding"])[ids])
    for got, want in zip(jax.tree.leaves(part.combine(trainable, frozen)), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _nll(module, params, batch):
    """Mean next-token NLL over every real position (plain log-softmax: independent of kwjax.losses)."""
    tokens, valid = batch["tokens_BT"], batch["valid_BT"]
    logits = module.apply({"params": params}, tokens, positions_from_mask(valid))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
    return -(picked * mask).sum() / mask.sum()


def test_the_rows_gradient_is_the_full_embeddings_gradient_at_those_rows():
    cfg = tiny_config(**ROWS)
    model = stages.load_model(cfg)
    part = partition.from_config(cfg, model.tokenizer)
    batch = jax.tree.map(np.asarray, prepare(cfg, "sft", stages.load_model(cfg)).train_batch(0))
    ids = np.asarray(part.ids)
    assert np.isin(batch["tokens_BT"], ids).any()  # the rows are used as inputs as well as outputs
    trainable, frozen = part.split(model.params)

    g_rows = jax.grad(lambda t: _nll(model.module, part.combine(t, frozen), batch))(trainable)
    g_full = jax.grad(lambda p: _nll(model.module, p, batch))(model.params)
    chex.assert_trees_all_close(g_rows["token_rows"], g_full["embedding"][ids], atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(g_rows["layer_0"], g_full["layer_0"], atol=1e-6, rtol=1e-5)
    assert float(jnp.abs(g_rows["token_rows"]).max()) > 0


def test_training_moves_those_rows_only_and_the_export_carries_them(tmp_path):
    cfg = tiny_config(max_steps=2, **ROWS)
    start = np.asarray(stages.load_model(cfg).params["embedding"])
    summary = stages.run(cfg, "sft", tmp_path / "run", progress=False)
    assert summary["sft"]["final_step"] == 2
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    saved = ckpt.manager.restore(ckpt.latest_step())["state"]["params"]
    ckpt.close()
    assert "embedding" not in saved and saved["token_rows"].shape == (2, start.shape[1])

    exported = np.asarray(kwjax.load(tmp_path / "run" / "model").params["embedding"])
    tok = stages.load_model(cfg).tokenizer
    ids = [tok.start_of_turn_id, tok.end_of_turn_id]
    changed = np.flatnonzero(np.any(exported != start, axis=1))
    assert set(changed) <= set(ids) and tok.end_of_turn_id in changed  # every SFT target ends with it
    np.testing.assert_array_equal(exported[ids], np.asarray(saved["token_rows"]))


@pytest.mark.parametrize("overrides, message", [
    ({"freeze": "embedding", "train_tokens": "<end_of_turn>,<no_such_piece>"},
     "train_tokens: '<no_such_piece>' is not a token of this model's tokenizer"),
    ({"freeze": "", "train_tokens": "<end_of_turn>"}, "train_tokens is set but the embedding is trained whole"),
    ({"freeze": "embedding", "train_tokens": "999999999"}, r"train_tokens: ids \[999999999\] lie outside"),
])
def test_bad_token_rows_settings_are_named_before_any_work(overrides, message, tmp_path):
    assert_refused_before_any_work(overrides, message, tmp_path)


def test_resuming_with_other_trained_rows_is_refused(tmp_path):
    cfg = tiny_config(checkpoint_every=1, **ROWS)
    T.train(cfg, "sft", tmp_path, stages.load_model(cfg), progress=False, interrupt_at=1)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    other = tiny_config(checkpoint_every=1, freeze="embedding", train_tokens="<end_of_turn>")
    with pytest.raises(T.TrainingError, match=r"train_tokens='<start_of_turn>,<end_of_turn>'.*this run has "
                                              r"freeze='embedding' \+ trained rows of train_tokens='<end_of_turn>'"):
        T.train(other, "sft", tmp_path, stages.load_model(other), progress=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_row_gradients_without_the_embeddings_gradient_equal_autodiff_through_the_logits(softcap):
    """losses.with_row_gradients against jax.grad of a plain log-softmax over E with the rows written in."""
    from kwjax import losses

    rng = np.random.default_rng(1)
    b, t, d, v = 2, 7, 16, 96
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((v, d)) * 0.5, jnp.float32)
    ids = jnp.asarray([5, 40, 77], jnp.int32)
    rows0 = jnp.asarray(rng.standard_normal((3, d)) * 0.5, jnp.float32)
    idx = jnp.asarray([[1, 2, 3, 4, 5], [0, 2, 4, 6, 6]], jnp.int32)
    targets = jnp.asarray([[5, 40, 1, 77, 9], [3, 77, 5, 8, 0]], jnp.int32)  # some targets are the rows
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], bool)

    def plain(rows):
        e = emb.at[ids].set(rows)
        z = jnp.einsum("btd,vd->btv", hidden, e)
        z = jnp.tanh(z / softcap) * softcap if softcap else z
        logp = jax.nn.log_softmax(z, -1)
        h_logp = jnp.take_along_axis(jnp.take_along_axis(logp, idx[..., None], 1), targets[..., None], -1)[..., 0]
        return jnp.where(mask, h_logp, 0.0)

    def ours(rows):
        e = jax.lax.stop_gradient(emb.at[ids].set(rows))
        lp = losses.response_logps(hidden, e, idx, targets, mask, chunk=2, softcap=softcap, vocab_chunk=32)
        return losses.with_row_gradients(lp, hidden, e, ids, rows, idx, targets, mask, softcap=softcap).token_logps_BR

    weights = jnp.asarray(rng.standard_normal((b, 5)), jnp.float32)  # any downstream use of each log-prob
    chex.assert_trees_all_close(ours(rows0), plain(rows0), atol=1e-5)
    g_ours = jax.grad(lambda r: jnp.sum(ours(r) * weights))(rows0)
    g_plain = jax.grad(lambda r: jnp.sum(plain(r) * weights))(rows0)
    chex.assert_trees_all_close(g_ours, g_plain, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(g_plain).min()) > 1e-4


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_the_steps_loss_gradient_in_the_rows_is_full_fine_tunings_at_those_rows(method):
    from kwjax import objectives
    from kwjax import step as steplib

    cfg = tiny_config(**ROWS)
    model = stages.load_model(cfg)
    run = prepare(cfg, method, stages.load_model(cfg))
    batch = jax.tree.map(jnp.asarray, run.batch("train", run.train_indices(0)))
    totals = objectives.totals(objectives.get(method, cfg), batch)
    part = run.partition
    trainable, frozen = part.split(model.params)
    g_rows = jax.grad(lambda t: steplib.make_loss_fn(run.module, method, cfg, part)(t, batch, None, totals,
                                                                                   frozen)[0])(trainable)
    full = partition.Partition()
    g_full = jax.grad(lambda p: steplib.make_loss_fn(run.module, method, cfg, full)(p, batch, None, totals)[0])(
        model.params)
    ids = np.asarray(part.ids)
    chex.assert_trees_all_close(g_rows["token_rows"], g_full["embedding"][ids], atol=1e-6, rtol=1e-4)
    chex.assert_trees_all_close(g_rows["layer_1"], g_full["layer_1"], atol=1e-6, rtol=1e-4)
    assert float(jnp.abs(g_rows["token_rows"]).max()) > 0
