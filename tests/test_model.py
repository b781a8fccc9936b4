"""Parity of the Flax Gemma 3 with transformers' Gemma3ForCausalLM on tiny random configs."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwjax
from kwjax.models.gemma3 import config as cfglib
from kwjax.models.gemma3.model import Gemma3, init_cache, positions_from_mask
from tests.conftest import hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def make_hf_checkpoint(tmp_path, config: cfglib.ModelConfig, seed: int = 0):
    """A random transformers Gemma 3 written by transformers itself (so our reader sees real files)."""
    torch.manual_seed(seed)
    hf_config = transformers.Gemma3TextConfig(**{k: v for k, v in config.to_hf_dict().items()
                                                 if k not in ("architectures", "model_type")})
    model = transformers.Gemma3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms default to zero; randomise everything so (1 + w) is really tested
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_tiny_parity_padded_and_longer_than_window(tmp_path, num_kv_heads):
    config = cfglib.tiny(num_kv_heads=num_kv_heads, sliding_window=8)
    assert set(config.layer_types) == {cfglib.SLIDING, cfglib.GLOBAL}
    hf_model = make_hf_checkpoint(tmp_path, config)
    loaded = kwjax.load(tmp_path, with_tokenizer=False)
    assert loaded.config == config

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=(3, 24))
    mask = np.ones_like(tokens)
    mask[1, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    ours = loaded.logits(tokens, mask)
    ref = hf_logits(hf_model, tokens, mask)
    valid = mask.astype(bool)
    chex.assert_trees_all_close(ours[valid], ref[valid], atol=2e-4, rtol=1e-4)
    assert np.isfinite(ours).all()  # padded rows too: no NaN leaks from fully masked rows


def test_sliding_window_changes_the_output():
    """Guards the parity test: with a window shorter than the text, masking must matter."""
    config = cfglib.tiny(sliding_window=4)
    params = kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(0))
    tokens = jnp.arange(20)[None] % config.vocab_size
    pos = positions_from_mask(jnp.ones_like(tokens))
    narrow = Gemma3(config).apply({"params": params}, tokens, pos)
    wide = Gemma3(config.replace(sliding_window=64)).apply({"params": params}, tokens, pos)
    chex.assert_trees_all_close(narrow[:, :4], wide[:, :4], atol=1e-5)
    assert np.abs(np.asarray(narrow[:, 8:] - wide[:, 8:])).max() > 1e-3


@pytest.mark.parametrize("prompt_len", [5, 13])
def test_kv_cache_decode_equals_full_forward(prompt_len):
    """Prefill + one-token steps through a ring-buffer sliding cache equal one full forward."""
    config = cfglib.tiny(sliding_window=6)
    params = kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(3))
    model = Gemma3(config)
    total = 20
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, total), 0, config.vocab_size)
    mask = jnp.ones((2, total), bool).at[1, :3].set(False)  # row 1 left-padded
    pos = positions_from_mask(mask)
    full = model.apply({"params": params}, tokens, pos)

    cache = init_cache(config, batch=2, max_len=32)
    assert cache[0]["k"].shape[1] == 6 and cache[2]["k"].shape[1] == 32  # sliding vs global slots
    step = jax.jit(lambda p, t, q, c: model.apply({"params": p}, t, q, c))
    logits, cache = step(params, tokens[:, :prompt_len], pos[:, :prompt_len], cache)
    outs = [logits]
    for i in range(prompt_len, total):
        logits, cache = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        outs.append(logits)
    stepped = jnp.concatenate(outs, axis=1)
    valid = np.asarray(mask)
    chex.assert_trees_all_close(np.asarray(stepped)[valid], np.asarray(full)[valid], atol=1e-4, rtol=1e-4)


def test_export_round_trip_through_transformers(tmp_path):
    config = cfglib.tiny()
    params = kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(7))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(8), x.shape), params)
    model = kwjax.LoadedModel(config, params, None, "random")
    kwjax.export_hf(model, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 19))
    chex.assert_trees_all_close(model.logits(tokens), hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)
    reloaded = kwjax.load(tmp_path / "hf", with_tokenizer=False)
    chex.assert_trees_all_close(reloaded.params, params, atol=0, rtol=0)


def test_bf16_params_compute_in_bf16_with_float32_logits(tmp_path):
    config = cfglib.tiny()
    make_hf_checkpoint(tmp_path, config)
    loaded = kwjax.load(tmp_path, dtype="bf16", with_tokenizer=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded.params))
    assert loaded.logits(np.arange(8)[None]).dtype == np.float32


def test_native_orbax_round_trip(tmp_path):
    config = cfglib.tiny()
    params = kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(5))
    model = kwjax.LoadedModel(config, params, None, "random")
    kwjax.weights.save_native(model, tmp_path / "m")
    back = kwjax.load(tmp_path / "m", with_tokenizer=False)
    assert back.config == config
    chex.assert_trees_all_close(back.params, params, atol=0, rtol=0)
    as_bf16 = kwjax.load(tmp_path / "m", dtype="bfloat16", with_tokenizer=False)
    assert as_bf16.params["embedding"].dtype == jnp.bfloat16


def test_presets_match_published_sizes():
    """Parameter counts of the presets against the published model sizes (rounded names)."""
    counts = {name: make().num_params for name, make in cfglib.PRESETS.items()}
    assert 260e6 < counts["gemma3-270m"] < 280e6
    assert 0.95e9 < counts["gemma3-1b"] < 1.05e9
    assert 3.8e9 < counts["gemma3-4b"] < 4.0e9  # the text tower of the 4B (vision ~0.4B extra)
    assert 11.5e9 < counts["gemma3-12b"] < 12.0e9
    assert 27.0e9 < counts["gemma3-27b"] < 27.5e9


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 4), (8, 1), (4, 6), (5, 5)])
def test_projection_paths_match_numpy(batch, length):
    """Few rows take the broadcast-multiply path on CPU, others the dot; both equal float64 numpy."""
    config = dataclasses.replace(cfglib.tiny(vocab_size=300), final_logit_softcap=30.0)
    rng = np.random.default_rng(batch * 10 + length)
    embedding_VD = rng.normal(size=(config.vocab_size, config.hidden_size)).astype(np.float32)
    hidden_BTD = rng.normal(size=(batch, length, config.hidden_size)).astype(np.float32)
    got = kwjax.models.gemma3.model.logits_from_hidden(config, jnp.asarray(embedding_VD), jnp.asarray(hidden_BTD))
    want = np.einsum("btd,vd->btv", hidden_BTD.astype(np.float64), embedding_VD.astype(np.float64))
    want = np.tanh(want / 30.0) * 30.0
    chex.assert_shape(got, (batch, length, config.vocab_size))
    chex.assert_trees_all_close(np.asarray(got, np.float64), want, atol=2e-4, rtol=1e-5)
