"""The jittable pieces of training: the forward pass to response log-probs, the loss of an objective,
the train step (gradient accumulation, fused AdamW update) and the eval step.

A step's arguments are the train state (trainable params, optimizer state, step; donated), the batch,
the on-the-fly reference tree (or None) and the frozen params tree (`kwjax.partition`). Gradients are
taken with respect to the trainable tree only.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kwjax import losses, objectives, optimizer
from kwjax.partition import Partition, merge
from kwjax.models.gemma3.model import ADAPTERS, Gemma3, positions_from_mask


def forward_logps(module: Gemma3, params, batch, chunk: int, keep_logits: bool = False,
                  rows=None, adapters=None) -> losses.ResponseLogps:
    """Response-token log-probs of a batch (`kwjax.batching` layout); no B × T × V logits are formed
    unless `keep_logits` (the backward pass then reuses the forward's, see `losses.response_logps`).

    `rows`: (ids_K, rows_KD), the trained rows of an otherwise frozen embedding (`kwjax.token_rows`),
    already written into `params["embedding"]`; their output-side gradient is added by
    `losses.with_row_gradients` instead of through the whole embedding's. `adapters`: the model's `lora`
    collection (`Partition.forward_trees`), or None."""
    variables = {"params": params} if adapters is None else {"params": params, ADAPTERS: adapters}
    hidden = module.apply(variables, batch["tokens_BT"], positions_from_mask(batch["valid_BT"]),
                          return_hidden=True)
    softcap = module.config.final_logit_softcap
    embedding = params["embedding"] if rows is None else jax.lax.stop_gradient(params["embedding"])
    lp = losses.response_logps(hidden, embedding, batch["target_idx_BR"], batch["targets_BR"],
                               batch["target_mask_BR"], chunk=chunk, softcap=softcap, keep_logits=keep_logits)
    if rows is None:
        return lp
    return losses.with_row_gradients(lp, hidden, embedding, rows[0], rows[1], batch["target_idx_BR"],
                                     batch["targets_BR"], batch["target_mask_BR"], softcap=softcap)


def compute_dtype(config, param_dtype):
    """The dtype of the forward and backward pass: `config.compute_dtype` (e.g. bfloat16 with float32
    parameters: mixed precision, the optimizer updating float32 master weights), else the parameters'."""
    name = config.get("compute_dtype", "") or ""
    if not name:
        return None
    from kwjax.weights import parse_dtype

    dtype = jnp.dtype(parse_dtype(name))
    return None if dtype == jnp.dtype(param_dtype) else dtype


def cast(params, dtype):
    """The parameters as the compute dtype sees them (gradients flow back to the master dtype)."""
    if dtype is None:
        return params
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def make_loss_fn(module: Gemma3, method: str, config, partition: Partition | None = None) -> Callable:
    """loss(trainable, micro_batch, ref, totals, frozen=None) -> (loss, metrics).

    The model reads `partition.forward_trees(trainable, frozen)` (default: nothing frozen).
    `totals` are the whole step's normalisers (`objectives.totals`). `ref`: the on-the-fly reference
    tree, laid over `frozen` (so it may hold only the trainable part, or nothing: the frozen weights
    alone), or None: the batch's precomputed `ref_logps_B`, or no reference for a reference-free loss.
    """
    objective = objectives.get(method, config)
    chunk = config.logprob_chunk
    keep = bool(config.get("logprob_keep_logits", False))
    cdtype = compute_dtype(config, module.param_dtype)
    partition = partition or Partition()

    rows_of = getattr(partition, "output_rows", None)  # kwjax.token_rows: trained rows of a frozen embedding

    def loss_fn(trainable, micro, ref, totals, frozen=None):
        rows = None if rows_of is None else cast(rows_of(trainable), cdtype)
        params, adapters = partition.forward_trees(trainable, frozen or {})
        lp = forward_logps(module, cast(params, cdtype), micro, chunk, keep, rows, cast(adapters, cdtype))
        ref_logps_B = None
        if objective.needs_reference:
            if ref is not None:  # same module, the frozen reference tree, no gradient
                ref_params = cast(merge(frozen, jax.lax.stop_gradient(ref)), cdtype)
                ref_logps_B = forward_logps(module, ref_params, micro, chunk).logps_B
            else:
                ref_logps_B = micro["ref_logps_B"]
        return objective.loss(lp, ref_logps_B, micro, totals, config)

    return loss_fn


def micro_batches(batch, k: int, pairs: bool):
    """[B, ...] -> [k, B/k, ...]; pair data keeps each pair's chosen and rejected rows in one micro-batch."""
    if not pairs:
        return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def split(x):
        rows = x.reshape(2, k, x.shape[0] // (2 * k), *x.shape[1:])
        return jnp.concatenate([rows[0], rows[1]], axis=1)

    return jax.tree.map(split, batch)


def make_train_step(module, method, config, tx: optimizer.AdamW, lr_schedule, on_the_fly: bool,
                    partition: Partition | None = None):
    """step(state, batch, ref, frozen=None) -> (state, metrics); jit it with the state donated, so that
    `tx.apply` rewrites the trainable parameters and their moments in place."""
    objective = objectives.get(method, config)
    partition = partition or Partition()
    loss_fn = make_loss_fn(module, method, config, partition)
    k = config.grad_accum
    pairs = objective.data == "pairs"

    def step(state, batch, ref, frozen=None):
        totals = objectives.totals(objective, batch)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        ref = ref if on_the_fly else None
        if k == 1:
            (_, metrics), grads = grad_fn(state["params"], batch, ref, totals, frozen)
        else:
            micros = micro_batches(batch, k, pairs)

            def body(carry, micro):
                (_, m), g = grad_fn(state["params"], micro, ref, totals, frozen)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            metric_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: loss_fn(state["params"], jax.tree.map(lambda x: x[0], micros), ref, totals, frozen)[1]))
            (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), micros)
        params, opt_state, grad_norm = tx.apply(grads, state["opt_state"], state["params"])
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state["step"]),
                       param_norm=optax.tree.norm(partition.combine(params, frozen or {})))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_step(module, method, config, on_the_fly: bool, partition: Partition | None = None):
    """eval(trainable, batch, ref, frozen=None) -> metrics of one batch, normalised within it."""
    objective = objectives.get(method, config)
    loss_fn = make_loss_fn(module, method, config, partition)

    def step(trainable, batch, ref, frozen=None):
        totals = objectives.totals(objective, batch)
        return loss_fn(trainable, batch, ref if on_the_fly else None, totals, frozen)[1]

    return step


def release_freed_memory() -> None:
    """Hands the heap memory that glibc keeps after frees back to the OS (elsewhere: nothing happens).

    Compiling the 270M model's DPO step frees ~370 MiB into glibc's heap, which stays resident; the
    step's own buffers are fresh mappings that never reuse it, so it would add to the training peak.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


class CompiledSteps:
    """A jitted step compiled ahead of time once per batch shape, the compiler's garbage released
    (`release_freed_memory`) before the step first runs and allocates its buffers."""

    def __init__(self, jitted: Callable):
        self.jitted = jitted
        self.compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0  # spent compiling, over all shapes (the loop's timings subtract it)

    def __call__(self, state, batch: dict, *rest):
        key = tuple((name, batch[name].shape) for name in sorted(batch))
        if key not in self.compiled:
            started = time.perf_counter()
            self.compiled[key] = self.jitted.lower(state, batch, *rest).compile()
            release_freed_memory()
            self.compile_seconds += time.perf_counter() - started
        return self.compiled[key](state, batch, *rest)
