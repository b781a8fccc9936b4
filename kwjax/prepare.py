"""Everything a training run builds before its loop, in one public function: `prepare`.

`kwjax.train` runs its loop on what this returns; `scripts/bench.py` times the same objects. The order
matters for memory: the reference log-probs are computed from the starting weights before the train
state takes over (is donated) their buffers, so the model is never held twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kwjax import batching, distributed, feed, objectives, optimizer, partition as partlib, sharding
from kwjax import reference as reflib
from kwjax import step as steplib
from kwjax.models.gemma3.model import Gemma3
from kwjax.weights import LoadedModel

log = logging.getLogger(__name__)
STAGE_METHODS = ("sft", "dpo")  # what one training stage runs; sft_dpo chains them (kwjax.stages)


class TrainingError(RuntimeError):
    """A run that had to stop: bad configuration, bad data, or a non-finite loss."""


def validate_config(config, method: str) -> objectives.Objective:
    """The method's objective, once the settings it reads are known to be valid."""
    if method not in STAGE_METHODS:
        raise TrainingError(f"unknown method {method!r}; expected one of ('sft', 'dpo', 'sft_dpo')")
    if config.batch_size <= 0 or config.epochs <= 0:
        raise TrainingError(f"batch_size and epochs must be positive (got {config.batch_size}, {config.epochs})")
    if config.grad_accum <= 0 or config.batch_size % config.grad_accum:
        raise TrainingError(f"batch_size {config.batch_size} must divide by grad_accum {config.grad_accum}")
    if config.checkpoint_every < 0:
        raise TrainingError(f"checkpoint_every is {config.checkpoint_every}; expected a step count, or 0 for the "
                            "final checkpoint only")
    try:
        objective = objectives.get(method, config)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if config.dpo.reference not in ("precomputed", "on_the_fly"):
        raise TrainingError(f"dpo.reference is {config.dpo.reference!r}; expected precomputed or on_the_fly")
    if config.data.too_long not in batching.TOO_LONG:
        raise TrainingError(f"data.too_long is {config.data.too_long!r}; expected one of {batching.TOO_LONG}")
    return objective


@dataclasses.dataclass
class Prepared:
    """A run ready for its loop. `state` holds the trainable tree; `frozen` and `ref` are the step's
    other arguments (`step_fn(state, batch, ref, frozen)`)."""

    config: Any
    method: str
    objective: objectives.Objective
    partition: partlib.Partition
    mesh: Any
    module: Gemma3
    train_data: feed.Data
    eval_data: feed.Data | None
    state: dict  # {"params": trainable, "opt_state", "step"}; donated to every step
    frozen: dict  # the parameters the run reads but never updates ({} for full fine-tuning)
    ref: Any  # the on-the-fly reference tree (laid over `frozen`), else None
    ref_logps: dict[str, np.ndarray]  # "train"/"eval": [N, 2] precomputed reference log-probs
    tx: optimizer.AdamW
    lr_schedule: Callable
    step_fn: steplib.CompiledSteps
    eval_fn: Callable  # eval_fn(trainable, batch, ref, frozen) -> replicated metrics of one batch
    steps_per_epoch: int
    total_steps: int
    _epoch_cache: Any = dataclasses.field(default=None, repr=False)  # (epoch, its batches)

    @property
    def on_the_fly(self) -> bool:
        return self.ref is not None

    def params(self, state: dict | None = None) -> dict:
        """The whole model's parameters: the frozen tree with the trainable one laid over it."""
        return self.partition.combine((state or self.state)["params"], self.frozen)

    def batch(self, split: str, idx) -> dict[str, jax.Array]:
        data = self.train_data if split == "train" else self.eval_data
        return feed.global_batch(data, idx, self.config, self.mesh, self.ref_logps.get(split))

    def train_indices(self, step: int) -> np.ndarray:
        """Step `step`'s rows: epoch order seeded by (seed, epoch), so a resume sees the same batches."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, feed.epoch_batches(self.config.seed, epoch, self.train_data.lengths(),
                                                           self.config.batch_size, self.config.data.group_by_length))
        return self._epoch_cache[1][pos]

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return self.batch("train", self.train_indices(step))


def _encode_splits(config, kind: str, model: LoadedModel) -> tuple[feed.Data, feed.Data | None]:
    from kwjax import data as datalib

    train_rows, eval_rows = datalib.split_rows(config, kind)
    train_data = feed.encode(train_rows, model.tokenizer, config, kind)
    eval_data = feed.encode(eval_rows, model.tokenizer, config, kind) if eval_rows else None
    return train_data, eval_data


def _check_processes_agree(config, train_data, eval_data, model, ref_params) -> None:
    """Multi-process: the same settings, data and weights everywhere, or a clear error."""
    distributed.all_equal({"config": distributed.digest(config.to_json_best_effort(sort_keys=True)),
                           "training data": distributed.digest(reflib.data_fingerprint(train_data)),
                           "evaluation data": distributed.digest(reflib.data_fingerprint(eval_data) if eval_data
                                                                 else "none")},
                          "the configuration or the data")
    distributed.all_equal({**distributed.params_digests(model.params),
                           **{f"reference {k}": v for k, v in distributed.params_digests(ref_params or {}).items()}},
                          "the starting weights")


def _write_data_report(directory: Path, config, train_data, eval_data) -> None:
    from kwjax.files import atomic_write_text

    reports = {"train": dataclasses.asdict(train_data.report),
               "eval": dataclasses.asdict(eval_data.report) if eval_data else None,
               "max_length": config.data.max_length, "too_long": config.data.too_long}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "data_report.json", json.dumps(reports, indent=2))


def prepare(config, method: str, model: LoadedModel, *, ref_params=None, devices=None,
            data: tuple[feed.Data, feed.Data | None] | None = None, report_dir: Path | None = None,
            on_reference_batch: Callable[[int, float], None] | None = None) -> Prepared:
    """Mesh, module, data, sharded trainable and frozen trees, optimizer, reference, state, jitted steps.

    `model.params` is donated to the train state: afterwards use `Prepared.params()`. The reference
    (objectives that need one) is `ref_params`, else the starting weights. `data` replaces the
    configured splits (encoded already); `report_dir` receives data_report.json (process 0).
    """
    objective = validate_config(config, method)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    divisor = sharding.batch_divisor(mesh) * config.grad_accum
    if config.batch_size % divisor:
        where = ""
        if distributed.is_multiprocess():
            where = (f" ({jax.process_count()} processes × {jax.local_device_count()} local devices; set "
                     f"batch_size to a multiple of {divisor})")
        raise TrainingError(f"batch_size {config.batch_size} does not divide over the mesh: data×fsdp = "
                            f"{sharding.batch_divisor(mesh)} devices × grad_accum {config.grad_accum}{where}")
    try:
        part = partlib.from_config(config, model.tokenizer)
        part.check(model.params)
    except partlib.PartitionError as e:
        raise TrainingError(str(e)) from None

    kind = "sft" if objective.data == "sft" else "dpo"
    train_data, eval_data = data if data is not None else _encode_splits(config, kind, model)
    log.info("train data: %s", train_data.report.summary())
    if distributed.is_multiprocess():
        _check_processes_agree(config, train_data, eval_data, model, ref_params)
    if report_dir is not None and distributed.is_main():
        _write_data_report(Path(report_dir), config, train_data, eval_data)
    if not train_data.items:
        raise TrainingError("no training rows left after encoding: " + train_data.report.summary())

    steps_per_epoch = math.ceil(len(train_data.items) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    cap = config[method].get("max_steps", 0) or config.get("max_steps", 0)  # the stage's own cap wins
    if cap:
        total_steps = min(total_steps, cap)
    peak_lr = config[method].get("learning_rate", config.optimizer.learning_rate)

    module = Gemma3(model.config, param_dtype=model.dtype, remat=config.remat)
    p_shard = sharding.param_shardings(model.params, mesh)
    params = distributed.put_global(model.params, p_shard)
    trainable, frozen = part.split(params)
    if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(trainable)):  # new (host) arrays: adapters
        trainable = distributed.put_global(trainable, sharding.param_shardings(trainable, mesh))
    frozen_shard = jax.tree.map(lambda x: x.sharding, frozen)
    tx, lr_schedule = optimizer.make(config.optimizer, peak_lr, total_steps, trainable)

    on_the_fly = objective.needs_reference and config.dpo.reference == "on_the_fly"
    ref_tree, ref_shard, ref_logps = None, None, {}
    if objective.needs_reference:
        reference = params if ref_params is None else distributed.put_global(ref_params, p_shard)
        if on_the_fly:
            ref_tree = part.reference_tree(reference, frozen)
            ref_shard = jax.tree.map(lambda x: x.sharding, ref_tree)
        else:
            from kwjax.paths import cache_dir

            root = cache_dir() / "reference_logps"
            seen = feed.rows_seen(config.seed, train_data.lengths(), config.batch_size,
                                  config.data.group_by_length, total_steps)
            ref_logps["train"] = reflib.reference_logps(module, reference, train_data, config, mesh, root,
                                                        "reference (train)", rows=seen,
                                                        on_batch=on_reference_batch)
            if eval_data is not None:
                ref_logps["eval"] = reflib.reference_logps(module, reference, eval_data, config, mesh, root,
                                                           "reference (eval)")
        del reference
    del params

    # Created under jit with the parameters' shardings; donated: the state takes over the trainable
    # buffers instead of holding a second copy for the whole run.
    state = jax.jit(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)},
                    donate_argnums=(0,))(trainable)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = steplib.CompiledSteps(jax.jit(
        steplib.make_train_step(module, method, config, tx, lr_schedule, on_the_fly, part),
        in_shardings=(state_shardings, None, ref_shard, frozen_shard),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,)))
    # metrics come back replicated: every process reads them (np.asarray of a sharded array fails there)
    eval_fn = jax.jit(steplib.make_eval_step(module, method, config, on_the_fly, part),
                      out_shardings=sharding.replicated(mesh))
    return Prepared(config, method, objective, part, mesh, module, train_data, eval_data, state, frozen, ref_tree,
                    ref_logps, tx, lr_schedule, step_fn, eval_fn, steps_per_epoch, total_steps)
