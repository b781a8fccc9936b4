"""Gemma 3 text model in Flax (linen), parameters as a plain pytree.

Shape suffixes: B batch, T query length, S key length (cache slots + new tokens), D hidden, F MLP width,
N query heads, K key/value heads, G = N // K query heads per KV head, H head dim, V vocabulary.

Attention masks are built from token *positions*, not array indices, so one code path serves
right-padded training batches, left-padded sampling batches and a KV cache whose sliding-window
layers are ring buffers: a key is visible to a query iff the key is valid, its position is not after
the query's, and (sliding layers) the query is less than `sliding_window` positions ahead of it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kwjax.models.gemma3.config import ModelConfig

Params = dict[str, Any]
LayerCache = dict[str, jax.Array]  # k_BSKH, v_BSKH, pos_BS (position per slot, -1 when empty)

_MASK_VALUE = -2.0**30  # finite, so fully masked (padding) rows give a uniform softmax, never NaN


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: `x * rsqrt(mean(x²) + eps) * (1 + scale)`, always in float32."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, base: float, scale: float) -> jax.Array:
    """Rotary embedding in the "rotate half" form; linear scaling divides positions by `scale`."""
    half = x_BTNH.shape[-1] // 2
    # Frequencies are float32 constants computed on the host as transformers does: the timescale
    # `base ** (2i / H)` rounded to float32, then a float32 reciprocal. An ulp of difference here is
    # multiplied by the position (thousands) and by Gemma's large qk-normed scores: XLA's float32
    # `pow` alone moved logits of a 1k-token input by 1.3e-3.
    exponent = np.arange(0, 2 * half, 2, dtype=np.float32) / np.float32(2 * half)
    timescale = np.power(np.float64(base), exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / timescale
    if scale != 1.0:
        inv_freq = inv_freq / np.float32(scale)
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def attention_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] visibility from positions; negative key positions mark padding or empty slots."""
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= q - k < window
    return visible


# The variable collection of low-rank adapters (`kwjax.lora`), kept apart from the weights they adapt.
ADAPTERS = "lora"


def plus_adapter(module: nn.Module, name: str, y, x):
    """`y` = x·W plus (x A) B when the `ADAPTERS` collection holds {"a": A [in, r], "b": B [r, out]} for
    weight `name` (its scale already in A); `x` is [B, T, in] (W's contracted dims flattened), `out` is
    the rest of `y`'s dims flattened.

    Why apart from W: with W + A B formed first, the backward pass would form W's full gradient
    (x^T dy, as many FLOPs as the forward matmul) only to project it onto A and B; here W is a
    constant and its matmul is differentiated for dx alone."""
    if not module.has_variable(ADAPTERS, name):
        return y
    ab = module.get_variable(ADAPTERS, name)
    a, b = ab["a"].astype(x.dtype), ab["b"].astype(x.dtype)
    return y + ((x @ a) @ b).reshape(y.shape).astype(y.dtype)


class Attention(nn.Module):
    config: ModelConfig
    layer: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, pos_BT, cache: LayerCache | None):
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(0.02)
        w_q = self.param("q", init, (d, n, h), self.param_dtype)
        w_k = self.param("k", init, (d, k, h), self.param_dtype)
        w_v = self.param("v", init, (d, k, h), self.param_dtype)
        w_o = self.param("o", init, (n, h, d), self.param_dtype)

        q_BTNH = plus_adapter(self, "q", jnp.einsum("btd,dnh->btnh", x_BTD, w_q), x_BTD)
        k_BTKH = plus_adapter(self, "k", jnp.einsum("btd,dkh->btkh", x_BTD, w_k), x_BTD)
        v_BTKH = plus_adapter(self, "v", jnp.einsum("btd,dkh->btkh", x_BTD, w_v), x_BTD)
        q_BTNH = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="query_norm")(q_BTNH)
        k_BTKH = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="key_norm")(k_BTKH)

        sliding = cfg.is_sliding(self.layer)
        base = cfg.rope_local_base if sliding else cfg.rope_global_base
        scale = 1.0 if sliding else cfg.rope_global_scale
        q_BTNH = rope(q_BTNH, pos_BT, base, scale)
        k_BTKH = rope(k_BTKH, pos_BT, base, scale)

        if cache is None:
            keys_BSKH, values_BSKH, key_pos_BS = k_BTKH, v_BTKH, pos_BT
            new_cache = None
        elif pos_BT.shape[1] == 1:
            # Decode: write first, then attend over the cache alone (no per-step concatenation). In a
            # sliding ring the slot overwritten held position p - window, which is outside the window.
            new_cache = write_cache(cache, k_BTKH, v_BTKH, pos_BT)
            keys_BSKH, values_BSKH, key_pos_BS = new_cache["k"], new_cache["v"], new_cache["pos"]
        else:
            keys_BSKH = jnp.concatenate([cache["k"], k_BTKH], axis=1)
            values_BSKH = jnp.concatenate([cache["v"], v_BTKH], axis=1)
            key_pos_BS = jnp.concatenate([cache["pos"], pos_BT], axis=1)
            new_cache = write_cache(cache, k_BTKH, v_BTKH, pos_BT)

        window = cfg.sliding_window if sliding else None
        mask_BTS = attention_mask(pos_BT, key_pos_BS, window)
        b, t = q_BTNH.shape[:2]
        q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h) * jnp.asarray(
            cfg.query_pre_attn_scalar**-0.5, q_BTNH.dtype)
        scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, keys_BSKH,
                                  preferred_element_type=jnp.float32)
        if cfg.attn_logit_softcap:
            scores_BKGTS = jnp.tanh(scores_BKGTS / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, _MASK_VALUE)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(values_BSKH.dtype)
        # The dot's natural output order (batch, lhs free, rhs free), then a transpose of this small
        # activation: written as "->btkgh" XLA:CPU picked a layout that transposed the large w_o
        # instead, on every decode step.
        out_BKGTH = jnp.einsum("bkgts,bskh->bkgth", probs_BKGTS, values_BSKH)
        out_BTF = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)
        return plus_adapter(self, "o", out_BTF @ w_o.reshape(n * h, -1), out_BTF), new_cache


def write_cache(cache: LayerCache, k_BTKH, v_BTKH, pos_BT) -> LayerCache:
    """Stores new keys at slot `position % slots`; a sliding layer's cache is a ring of window slots.

    Only the last `slots` valid tokens of a chunk are written, so a long prompt never writes two
    tokens to one slot (scatter order would be undefined); padding (position < 0) is never written.
    """
    slots = cache["pos"].shape[1]
    last_BT = jnp.max(pos_BT, axis=1, keepdims=True)
    keep_BT = (pos_BT >= 0) & (pos_BT > last_BT - slots)
    slot_BT = jnp.where(keep_BT, pos_BT % slots, slots)  # out of range -> dropped
    rows_BT = jnp.broadcast_to(jnp.arange(pos_BT.shape[0])[:, None], pos_BT.shape)
    return {
        "k": cache["k"].at[rows_BT, slot_BT].set(k_BTKH.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[rows_BT, slot_BT].set(v_BTKH.astype(cache["v"].dtype), mode="drop"),
        "pos": cache["pos"].at[rows_BT, slot_BT].set(pos_BT, mode="drop"),
    }


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[LayerCache]:
    """Empty per-layer caches: global layers hold `max_len` slots, sliding layers at most the window."""
    caches = []
    for layer in range(config.num_layers):
        slots = min(max_len, config.sliding_window) if config.is_sliding(layer) else max_len
        shape = (batch, slots, config.num_kv_heads, config.head_dim)
        caches.append({
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, slots), -1, jnp.int32),
        })
    return caches


class MLP(nn.Module):
    config: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        d, f = self.config.hidden_size, self.config.intermediate_size
        init = nn.initializers.normal(0.02)
        gate_DF = self.param("gate", init, (d, f), self.param_dtype)
        up_DF = self.param("up", init, (d, f), self.param_dtype)
        down_FD = self.param("down", init, (f, d), self.param_dtype)
        gate_BTF = plus_adapter(self, "gate", x_BTD @ gate_DF, x_BTD)
        h_BTF = jax.nn.gelu(gate_BTF, approximate=True) * plus_adapter(self, "up", x_BTD @ up_DF, x_BTD)
        return plus_adapter(self, "down", h_BTF @ down_FD, h_BTF)


class Block(nn.Module):
    config: ModelConfig
    layer: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, pos_BT, cache):
        cfg, pd = self.config, self.param_dtype
        h, new_cache = Attention(cfg, self.layer, pd, name="attn")(
            RMSNorm(cfg.rms_norm_eps, pd, name="pre_attention_norm")(x_BTD), pos_BT, cache)
        x_BTD = x_BTD + RMSNorm(cfg.rms_norm_eps, pd, name="post_attention_norm")(h)
        h = MLP(cfg, pd, name="mlp")(RMSNorm(cfg.rms_norm_eps, pd, name="pre_ffw_norm")(x_BTD))
        x_BTD = x_BTD + RMSNorm(cfg.rms_norm_eps, pd, name="post_ffw_norm")(h)
        return x_BTD, new_cache


class Gemma3(nn.Module):
    """The decoder stack. `__call__` returns float32 logits, or the final hidden states.

    Hidden states let training compute log-probs for response positions only, in vocabulary-sized
    chunks (see `logits_from_hidden`), instead of materialising B×T×262k logits.
    """

    config: ModelConfig
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, cache: list[LayerCache] | None = None, *,
                 return_hidden: bool = False):
        cfg = self.config
        embedding_VD = self.param("embedding", nn.initializers.normal(1.0),
                                  (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        x_BTD = x_BTD * jnp.asarray(cfg.hidden_size**0.5, x_BTD.dtype)
        new_caches = []
        for layer in range(cfg.num_layers):
            block = Block(cfg, layer, self.param_dtype, name=f"layer_{layer}")
            if self.remat and cache is None and not self.is_initializing():
                x_BTD, layer_cache = recomputed_in_backward(block, x_BTD, positions_BT), None
            else:
                x_BTD, layer_cache = block(x_BTD, positions_BT, None if cache is None else cache[layer])
            new_caches.append(layer_cache)
        x_BTD = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="final_norm")(x_BTD)
        out = x_BTD if return_hidden else logits_from_hidden(cfg, embedding_VD, x_BTD)
        return (out, new_caches) if cache is not None else out


_DIFFERENTIATED = ("params", ADAPTERS)  # the collections a recomputed layer passes gradients back to


def _block_forward(block: Block, x_BTD, positions_BT):
    return block(x_BTD, positions_BT, None)[0]


def _block_forward_saving_inputs(block: Block, x_BTD, positions_BT):
    return _block_forward(block, x_BTD, positions_BT), (block.variables, x_BTD, positions_BT)


def _once_exists(x_BTD, ct_BTD):
    """x, as a value XLA can only compute once `ct` exists: x − 0·|ct₀|, exactly x for a finite ct (a
    non-finite cotangent makes the gradients non-finite anyway)."""
    return x_BTD - jnp.zeros((), x_BTD.dtype) * jnp.abs(ct_BTD[0, 0, 0]).astype(x_BTD.dtype)


def _block_backward(block: Block, saved, out_ct_BTD):
    """Recomputes the layer from its inputs, once the cotangent of its output exists, and backpropagates.

    With `nn.remat` (or an optimisation barrier, which XLA:CPU removes before scheduling) XLA was free
    to schedule every layer's recomputation right after the forward pass, holding all layers'
    activations at once again: the DPO step's memory plan did not shrink at all. A data dependency on
    the cotangent makes each layer's recomputation wait for its turn in the backward pass.
    """
    variables, x_BTD, positions_BT = saved
    x_BTD = _once_exists(x_BTD, out_ct_BTD)
    fresh = block.clone(parent=None)
    _, vjp = jax.vjp(lambda v, x: fresh.apply(v, x, positions_BT, None)[0], variables, x_BTD)
    variables_ct, x_ct_BTD = vjp(out_ct_BTD)
    positions_ct = np.zeros(positions_BT.shape, jax.dtypes.float0)
    return {k: v for k, v in variables_ct.items() if k in _DIFFERENTIATED}, x_ct_BTD, positions_ct


def recomputed_in_backward(block: Block, x_BTD, positions_BT):
    """`block(x, positions)` keeping only its inputs for the backward pass (Gemma3's `remat`)."""
    return nn.custom_vjp(_block_forward, _block_forward_saving_inputs,
                         lambda saved, ct: _block_backward(block, saved, ct),
                         grad_vars=list(_DIFFERENTIATED))(block, x_BTD, positions_BT)


# On XLA:CPU a dot with only a few rows (decoding a small batch: 4-24 hidden states against the
# 262k-row embedding) runs at a third of the memory bandwidth; a broadcast multiply + reduce with the
# vocabulary as the outer dimension streams the embedding once and is ~1.7x faster (measured with
# `scripts/bench.py sampling`; at 1 row or 32+ rows the dot is faster). Accelerators always use the dot.
SKINNY_ROWS = (4, 24)


def logits_from_hidden(config: ModelConfig, embedding_VD, hidden_BTD) -> jax.Array:
    """Tied output projection with float32 accumulation, whatever the parameter dtype."""
    b, t, d = hidden_BTD.shape
    if SKINNY_ROWS[0] <= b * t <= SKINNY_ROWS[1] and jax.default_backend() == "cpu":
        h_RD = hidden_BTD.reshape(b * t, d).astype(jnp.float32)
        logits_VR = jnp.sum(embedding_VD.astype(jnp.float32)[:, None, :] * h_RD[None], axis=-1)
        logits = logits_VR.T.reshape(b, t, -1)
    else:
        logits = jnp.einsum("btd,vd->btv", hidden_BTD, embedding_VD, preferred_element_type=jnp.float32)
    if config.final_logit_softcap:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Positions 0, 1, 2… over valid tokens (left or right padding), -1 on padding."""
    mask = mask_BT.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, -1)


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> Params:
    """The parameter pytree as ShapeDtypeStructs, without allocating weights."""
    model = Gemma3(config, param_dtype=dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (tests, from-scratch runs); real runs load weights instead."""
    model = Gemma3(config, param_dtype=dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda r: model.init(r, tokens, tokens))(rng)["params"]
