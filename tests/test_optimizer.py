"""The fused AdamW update against the optax chain it replaces: values, state layout, memory."""

from __future__ import annotations

import types

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from kwjax import optimizer

STEPS = 6


def opt_config(**overrides):
    base = dict(schedule="constant", warmup_ratio=0.0, weight_decay=0.0, decay_embedding=False,
                b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
    return types.SimpleNamespace(**{**base, **overrides})


def random_params(key):
    """Gemma-like names: an embedding (masked from decay unless asked), a layer's matrices and norms."""
    k = jax.random.split(key, 5)
    return {
        "embedding": jax.random.normal(k[0], (64, 8)),
        "final_norm": {"scale": jax.random.normal(k[1], (8,)) * 0.1},
        "layer_0": {"attn": {"q": jax.random.normal(k[2], (8, 2, 4)) * 0.2},
                    "mlp": {"down": jax.random.normal(k[3], (16, 8)) * 0.2},
                    "pre_ffw_norm": {"scale": jax.random.normal(k[4], (8,)) * 0.1}},
    }


def random_grads(key, params, scale: float):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves)])


def run_both(tx: optimizer.AdamW, params, grads_seq, start_state=None):
    """(params, state) after each step: the optax chain (reference) and the fused update, side by side."""
    chain = tx.reference()
    ref_p, ref_s = params, start_state if start_state is not None else chain.init(params)
    new_p, new_s = params, start_state if start_state is not None else tx.init(params)
    fused = jax.jit(tx.apply)
    out = []
    for grads in grads_seq:
        updates, ref_s = chain.update(grads, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, updates)
        new_p, new_s, norm = fused(grads, new_s, new_p)
        out.append(((ref_p, ref_s), (new_p, new_s), float(norm)))
    return out


def assert_states_close(new_s, ref_s, grad_scale: float):
    """Equal structure and counts; moments equal to about an ulp of the gradients' magnitude.

    Rounding differs slightly: the fused update is one XLA kernel per parameter (which may contract
    multiply-adds) and clips with a scalar factor instead of optax's per-element division, so a moment
    that nearly cancels (b1·m + (1 - b1)·g ≈ 0) differs in relative terms, not in absolute ones.
    """
    chex.assert_trees_all_equal_structs(new_s, ref_s)
    adam, ref_adam = new_s[-1][0], ref_s[-1][0]
    assert int(adam.count) == int(ref_adam.count) and int(new_s[-1][2].count) == int(ref_s[-1][2].count)
    chex.assert_trees_all_close(adam.mu, ref_adam.mu, rtol=1e-6, atol=1e-6 * grad_scale)
    chex.assert_trees_all_close(adam.nu, ref_adam.nu, rtol=1e-6, atol=1e-6 * grad_scale**2)


CASES = {
    # clipping on every step, weight decay on matrices but not the embedding, warmup then cosine decay
    "clipped_masked_decay_cosine": dict(config=dict(clip_norm=0.5, weight_decay=0.1, schedule="cosine",
                                                    warmup_ratio=0.34), grad_scale=1.0, clipped=True),
    # the norm stays under clip_norm: the gradients pass unscaled
    "clip_inactive_constant": dict(config=dict(clip_norm=100.0), grad_scale=0.5, clipped=False),
    # clip_norm 0: no clipping at all (the chain has no clip state); decay on the embedding too
    "no_clipping_decay_embedding_linear": dict(config=dict(clip_norm=0.0, weight_decay=0.05, decay_embedding=True,
                                                           schedule="linear", warmup_ratio=0.5),
                                               grad_scale=3.0, clipped=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_update_matches_the_optax_chain(case):
    spec = CASES[case]
    params = random_params(jax.random.PRNGKey(0))
    tx, lr = optimizer.make(opt_config(**spec["config"]), 1e-2, STEPS, params)
    grads_seq = [random_grads(jax.random.PRNGKey(10 + i), params, spec["grad_scale"]) for i in range(STEPS)]
    for step, ((ref_p, ref_s), (new_p, new_s), norm) in enumerate(run_both(tx, params, grads_seq)):
        assert norm == pytest.approx(float(optax.tree.norm(grads_seq[step])), rel=1e-6)
        if tx.clip_norm > 0:
            assert (norm > tx.clip_norm) == spec["clipped"]
        assert_states_close(new_s, ref_s, spec["grad_scale"])
        chex.assert_trees_all_close(new_p, ref_p, rtol=1e-6, atol=1e-7)
    assert float(lr(0)) != float(lr(STEPS - 1)) or spec["config"].get("schedule", "constant") == "constant"


def test_parameters_actually_move_and_decay_follows_the_mask():
    params = random_params(jax.random.PRNGKey(1))
    zero = jax.tree.map(jnp.zeros_like, params)
    tx, _ = optimizer.make(opt_config(weight_decay=0.5), 1e-1, STEPS, params)
    new_p, _, _ = tx.apply(zero, tx.init(params), params)
    # a zero gradient leaves only weight decay: matrices shrink, norms and the embedding do not
    chex.assert_trees_all_close(new_p["layer_0"]["mlp"]["down"], params["layer_0"]["mlp"]["down"] * (1 - 0.05),
                                rtol=1e-6)
    chex.assert_trees_all_equal(new_p["embedding"], params["embedding"])
    chex.assert_trees_all_equal(new_p["final_norm"], params["final_norm"])


def test_state_is_the_chains_so_checkpoints_resume_either_way():
    """A state the optax chain produced (an older checkpoint) continues under the fused update."""
    params = random_params(jax.random.PRNGKey(2))
    tx, _ = optimizer.make(opt_config(clip_norm=0.5, weight_decay=0.1, schedule="cosine", warmup_ratio=0.3),
                           1e-2, STEPS, params)
    grads_seq = [random_grads(jax.random.PRNGKey(20 + i), params, 1.0) for i in range(STEPS)]
    chex.assert_trees_all_equal_structs(tx.init(params), tx.reference().init(params))
    halfway = run_both(tx, params, grads_seq[:3])[-1][0]  # the chain's (params, state) after 3 steps
    resumed = run_both(tx, halfway[0], grads_seq[3:], start_state=halfway[1])[-1][1]
    straight = run_both(tx, params, grads_seq)[-1][0]
    chex.assert_trees_all_close(resumed, straight, rtol=1e-6, atol=1e-7)


def test_update_writes_in_place_without_a_clipped_copy():
    """XLA's plan for a donated update of a 4 MiB leaf: no temporary of its size (optax's chain makes
    a clipped copy of every gradient, 640 MiB for Gemma 3 270M's embedding)."""
    params = {"embedding": jax.ShapeDtypeStruct((4096, 256), jnp.float32),
              "layer_0": {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}}
    tx, _ = optimizer.make(opt_config(clip_norm=1.0, weight_decay=0.1), 1e-3, 10, params)
    state = jax.eval_shape(tx.init, params)

    def update(p, s, g):
        return tx.apply(g, s, p)[:2]

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, state, params).compile()
    leaf_bytes = 4096 * 256 * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < leaf_bytes // 4, f"{temp} bytes of temporaries: a copy of a gradient is back"
