"""AdamW with warmup and decay, global-norm clipping and a weight-decay mask, all from the config."""

from __future__ import annotations

import jax
import optax


def schedule(cfg, peak_lr: float, total_steps: int) -> optax.Schedule:
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak_lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak_lr, 0.0, max(1, total_steps - warmup))
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, max(1, total_steps - warmup))
    else:
        raise ValueError(f"optimizer.schedule is {cfg.schedule!r}; expected cosine, linear or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup), after], [warmup])


def decay_mask(params, decay_embedding: bool):
    """Decay matrices only: norms (1-D) never; the embedding only when asked (it is the output head too)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and (decay_embedding or getattr(path[0], "key", None) != "embedding"),
        params)


def make(cfg, peak_lr: float, total_steps: int, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(cfg, peak_lr, total_steps)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask(params, cfg.decay_embedding))
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*chain, adamw), lr
