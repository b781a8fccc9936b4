"""Greedy continuation with the KV cache: enough for the demo and the top-tokens CLI.

Batched prompts are left-padded so every row's next token sits in the last column; positions come
from the mask, so padding changes nothing. (Temperature/top-k/top-p, stop reasons and bucketing
are the sampling issue's work.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kwjax.model import Gemma3, init_cache, positions_from_mask


@functools.lru_cache(maxsize=8)
def _step_fn(module: Gemma3):
    def step(params, tokens_BT, positions_BT, cache):
        logits_BTV, cache = module.apply({"params": params}, tokens_BT, positions_BT, cache)
        return logits_BTV[:, -1], cache

    return jax.jit(step, donate_argnums=(3,))


def greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...] = ()
           ) -> list[list[int]]:
    """Greedy new tokens for each prompt (stop token included when reached)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, True
    step = _step_fn(model.module)
    cache = init_cache(model.config, len(prompts), width + max_new_tokens, model.dtype)
    positions = positions_from_mask(jnp.asarray(mask))
    logits, cache = step(model.params, jnp.asarray(tokens), positions, cache)
    next_pos = positions[:, -1:] + 1
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(max_new_tokens):
        nxt = np.asarray(jnp.argmax(logits, axis=-1))
        for i, t in enumerate(nxt):
            if not done[i]:
                out[i].append(int(t))
                done[i] = int(t) in stop_ids
        if done.all():
            break
        logits, cache = step(model.params, jnp.asarray(nxt[:, None], jnp.int32), next_pos, cache)
        next_pos = next_pos + 1
    return out
