"""losses.response_logps over several vocabulary tiles: values, gradients, dtypes and memory.

tests/test_losses.py checks response_logps against numpy with a vocabulary smaller than one tile; here
the vocabulary is split into (strided) tiles, so the online log-sum-exp and the tiled backward pass
(its own custom VJP) are exercised.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwjax import losses
from tests.conftest import random_logps_inputs


@pytest.fixture(scope="module")
def case():
    V = 50
    hidden, emb, idx, tgt, mask = random_logps_inputs(np.random.default_rng(1), B=3, T=10, D=8, V=V, R=6,
                                                      emb_scale=0.7)
    tgt[0, :3] = [0, V - 1, 16]  # the first and last vocabulary ids among the targets
    mask[1, 4:] = False
    mask[2] = False
    return hidden, emb, idx, tgt, mask


def plain(hidden, emb, idx, tgt, mask, softcap=None):
    """The obvious implementation: full logits, log_softmax, autodiff."""
    h = jnp.take_along_axis(hidden, jnp.asarray(idx)[..., None], axis=1)
    logits = jnp.einsum("brd,vd->brv", h, emb)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], axis=-1)[..., 0] * mask
    count = mask.sum(-1)
    mean = (logits.mean(-1) * mask).sum(-1) / np.maximum(count, 1)
    return tok, mean


def objective(out_tok, out_mean):
    # weights every position differently, and gives the mean-logit output a gradient too
    w = jnp.arange(1.0, 1.0 + out_tok.size).reshape(out_tok.shape) / out_tok.size
    return jnp.sum(out_tok * w) + 0.37 * jnp.sum(out_mean)


@pytest.mark.parametrize("vocab_chunk", [1, 7, 16, 25, 50, 64])  # 50 tiles of 1 … one tile of 50
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("keep_logits", [False, True])  # backward recomputes each tile, or reuses the forward's
def test_tiles_match_plain(case, vocab_chunk, chunk, softcap, keep_logits):
    hidden, emb, idx, tgt, mask = case

    def tiled(h, e):
        out = losses.response_logps(h, e, idx, tgt, mask, chunk=chunk, softcap=softcap, vocab_chunk=vocab_chunk,
                                    keep_logits=keep_logits)
        return out.token_logps_BR, out.mean_logit_B

    got, want = tiled(hidden, emb), plain(hidden, emb, idx, tgt, mask, softcap)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-5)
    g = jax.grad(lambda h, e: objective(*tiled(h, e)), argnums=(0, 1))(hidden, emb)
    g_want = jax.grad(lambda h, e: objective(*plain(h, e, idx, tgt, mask, softcap)), argnums=(0, 1))(hidden, emb)
    chex.assert_trees_all_close(g, g_want, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(g[0])[2], 0.0)  # a fully masked row has no gradient


def test_vocab_tiles():
    assert losses.vocab_tiles(262_144, 8192) == 32  # Gemma 3 270M/1B: 32 tiles of 8192
    assert losses.vocab_tiles(262_208, 8192) == 34  # 4B-27B: 262,208 = 34 × 7712
    assert losses.vocab_tiles(50, 7) == 10 and losses.vocab_tiles(50, 16) == 5 and losses.vocab_tiles(50, 64) == 1
    assert losses.vocab_tiles(262_147, 8192) == 1  # no divisor near the wanted size: one tile


def test_jit(case):
    hidden, emb, idx, tgt, mask = case
    f = jax.jit(lambda h, e: losses.response_logps(h, e, idx, tgt, mask, chunk=4, vocab_chunk=16).logps_B.sum())
    g = jax.jit(jax.grad(lambda h, e: losses.response_logps(h, e, idx, tgt, mask, chunk=4,
                                                             vocab_chunk=16).logps_B.sum(), argnums=(0, 1)))
    assert np.isfinite(float(f(hidden, emb)))
    gh, ge = g(hidden, emb)
    assert gh.shape == hidden.shape and ge.shape == emb.shape


def test_bfloat16(case):
    hidden, emb, idx, tgt, mask = case
    hb, eb = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(emb, jnp.bfloat16)

    def f(h, e):
        return losses.response_logps(h, e, idx, tgt, mask, chunk=4, vocab_chunk=16).logps_B.sum()

    out = losses.response_logps(hb, eb, idx, tgt, mask, chunk=4, vocab_chunk=16)
    assert out.logps_B.dtype == jnp.float32  # log-probs are float32 whatever the parameters
    ref = f(jnp.asarray(hb, jnp.float32), jnp.asarray(eb, jnp.float32))
    np.testing.assert_allclose(float(out.logps_B.sum()), float(ref), rtol=1e-2)
    gh, ge = jax.grad(f, argnums=(0, 1))(hb, eb)
    assert gh.dtype == jnp.bfloat16 and ge.dtype == jnp.bfloat16
    gh32, ge32 = jax.grad(f, argnums=(0, 1))(jnp.asarray(hb, jnp.float32), jnp.asarray(eb, jnp.float32))
    np.testing.assert_allclose(np.asarray(ge, np.float32), ge32, atol=2e-2 * float(jnp.abs(ge32).max()))
    np.testing.assert_allclose(np.asarray(gh, np.float32), gh32, atol=2e-2 * float(jnp.abs(gh32).max()))


def test_backward_memory_is_one_tile():
    """The gradient never holds B × R × V logits: XLA's temporary memory stays near one tile."""
    B, T, D, V, R = 4, 80, 64, 65536, 64
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    e = jax.ShapeDtypeStruct((V, D), jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(R), (B, R))
    tgt = jnp.zeros((B, R), jnp.int32)
    mask = jnp.ones((B, R), bool)

    def loss(hidden, emb):
        return losses.response_logps(hidden, emb, idx, tgt, mask, chunk=64, vocab_chunk=4096).logps_B.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, e).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = B * R * V * 4  # 64 MiB
    tile = B * R * 4096 * 4  # 4 MiB
    assert temp < full_logits / 4, (temp, full_logits)
    assert temp < 8 * tile, (temp, tile)
