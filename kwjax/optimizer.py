"""AdamW with warmup and decay, global-norm clipping and a weight-decay mask, all from the config.

The update is `optax.chain(optax.clip_by_global_norm(c), optax.adamw(...))` written out per parameter:
`AdamW.apply` clips each gradient, updates its two moments and its parameter in one expression, and
returns the new parameters instead of an `updates` tree. optax's chain materialises a clipped copy of
every gradient (both moments read it; the 640 MiB tied embedding of Gemma 3 270M included) and a
separate updates tree; here XLA writes the moments and parameters in place into the donated train
state. The state is the chain's own (`AdamW.reference`), so checkpoints of either restore in the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
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
    """Decay matrices only: norms (1-D) never; the embedding (and trained rows of it) only when asked:
    it is the output head too."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and (decay_embedding or getattr(path[0], "key", None) not in
                                         ("embedding", "token_rows")),
        params)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity (the mask is a dict)
class AdamW:
    """Clipped AdamW as one fused update per parameter; the numerics of `reference()` (optax).

    `clip_norm <= 0` disables clipping; `mask` (a pytree of bools like the parameters) says which
    parameters get weight decay.
    """

    learning_rate: optax.Schedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    mask: Any

    def reference(self) -> optax.GradientTransformation:
        """The optax chain this update reproduces; its `init` defines the state layout."""
        adamw = optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay, mask=self.mask)
        clip = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm > 0 else []
        return optax.chain(*clip, adamw)

    def init(self, params):
        return self.reference().init(params)

    def apply(self, grads, state, params):
        """(new params, new state, the gradients' global norm, before clipping).

        Donate params and state to the jitted caller: each parameter's moments and value are then
        rewritten where they lie, with no clipped or `updates` copy of the gradients.
        """
        *clip_state, (adam, masked, sched) = state
        grad_norm = optax.tree.norm(grads)  # what optax.clip_by_global_norm computes
        count = optax.safe_increment(adam.count)
        hyper = _StepScalars(clip_scale=self._clip_scale(grad_norm), correction1=1 - self.b1**count,
                             correction2=1 - self.b2**count, step_size=-self.learning_rate(sched.count))
        leaves = [self._leaf(g, p, m, v, decay, hyper) for g, p, m, v, decay in zip(
            *(jax.tree.leaves(t) for t in (grads, params, adam.mu, adam.nu, self.mask)))]
        treedef = jax.tree.structure(params)
        new_params, mu, nu = (treedef.unflatten(column) for column in zip(*leaves))
        adam = adam._replace(count=count, mu=mu, nu=nu)
        sched = sched._replace(count=optax.safe_increment(sched.count))
        return new_params, (*clip_state, (adam, masked, sched)), grad_norm

    def _clip_scale(self, grad_norm):
        """1, or clip_norm / grad_norm when the norm exceeds it.

        optax computes `(g / norm) * clip_norm` per element; that division made XLA write a clipped copy
        of each gradient for the two moments to read. A scalar factor is fused into both instead; the
        clipped gradient differs from optax's by at most an ulp or so (tests/test_optimizer.py).
        """
        if self.clip_norm <= 0:
            return jnp.ones((), grad_norm.dtype)
        return jnp.where(grad_norm < self.clip_norm, jnp.ones((), grad_norm.dtype), self.clip_norm / grad_norm)

    def _leaf(self, g, p, mu, nu, decay: bool, hyper: "_StepScalars"):
        """One parameter's (value, first moment, second moment) after the step, in optax's operation order."""
        if self.clip_norm > 0:  # optax.clip_by_global_norm, as one scalar factor (see `_clip_scale`)
            g = g * hyper.clip_scale.astype(g.dtype)
        mu = (1 - self.b1) * g + self.b1 * mu  # optax.scale_by_adam
        nu = (1 - self.b2) * (g**2) + self.b2 * nu
        mu_hat = mu / hyper.correction1.astype(mu.dtype)
        nu_hat = nu / hyper.correction2.astype(nu.dtype)
        update = mu_hat / (jnp.sqrt(nu_hat) + self.eps)  # optax's eps_root is 0
        if decay and self.weight_decay != 0.0:  # optax.add_decayed_weights under optax.masked
            update = update + self.weight_decay * p
        update = jnp.array(hyper.step_size, dtype=update.dtype) * update  # optax.scale_by_learning_rate
        return jnp.asarray(p + update).astype(p.dtype), mu, nu  # optax.apply_updates


@dataclasses.dataclass(frozen=True)
class _StepScalars:
    """The scalars every parameter's update shares in one step."""

    clip_scale: jax.Array  # what multiplies every gradient: 1, or clip_norm / global norm
    correction1: jax.Array  # Adam's bias corrections 1 - b**t
    correction2: jax.Array
    step_size: jax.Array  # minus the scheduled learning rate


def make(cfg, peak_lr: float, total_steps: int, params) -> tuple[AdamW, optax.Schedule]:
    lr = schedule(cfg, peak_lr, total_steps)
    tx = AdamW(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm,
               mask=decay_mask(params, cfg.decay_embedding))
    return tx, lr
