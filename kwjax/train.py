"""SFT and DPO training: sharded, jit-compiled train steps over a `jax.sharding.Mesh`.

One model, two parameter trees: the policy being trained and the frozen reference. By default the
reference's sequence log-probs are computed once over the data before training and cached on disk
(keyed by the data and the reference weights), so a DPO step runs one model; `dpo.reference =
"on_the_fly"` computes them inside the step instead, without gradient.

A run is reproducible and resumable: the data order of epoch e is a permutation seeded by (seed, e),
and a checkpoint records the step, so `--resume` continues with exactly the batches an uninterrupted
run would have seen.

The same code runs multi-process (a Cloud TPU slice; `kwjax.distributed`): every process encodes the
data, builds the same global batch order and collates only the rows its own devices hold; the
reference pass and evaluation run on the same sharded batches with their results replicated to every
process; Orbax checkpoints are written by all processes; metrics, progress, reports and exports come
from process 0. A 2-process run computes the losses of a 1-process run on the same mesh shape
(tests/test_multiprocess.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kwjax import batching, distributed, losses, optimizer, sharding
from kwjax.checkpoint import Checkpointer
from kwjax.model import Gemma3, positions_from_mask
from kwjax.tracking import MetricsWriter
from kwjax.weights import LoadedModel

log = logging.getLogger(__name__)
METHODS = ("sft", "dpo", "sft_dpo")


class TrainingError(RuntimeError):
    """A run that had to stop: bad configuration, bad data, or a non-finite loss."""


@dataclasses.dataclass
class Data:
    """Encoded rows of one split: SFT sequences or DPO pairs, with their ids."""

    items: list
    ids: list[str]
    report: batching.Report
    kind: str  # "sft" or "dpo"

    def collate(self, indices, bucket: int, rows: int) -> dict[str, np.ndarray]:
        chosen = [self.items[i] for i in indices]
        if self.kind == "sft":
            return batching.collate(chosen, bucket, rows=rows)
        return batching.collate_pairs(chosen, bucket, rows=rows)

    def rows(self, indices, batch_size: int) -> list:
        """The batch's rows in collated order (DPO: chosen rows, then rejected rows); None pads."""
        return batching.batch_rows([self.items[i] for i in indices], self.kind, batch_size)


# ---- data -----------------------------------------------------------------------------------------


def load_rows(config, kind: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) in the SFT or DPO view: the shipped set, or the configured files."""
    from kwjax import data

    if config.data.train_file:
        train = data.load_records(config.data.train_file, kind)
        evals = data.load_records(config.data.eval_file, kind) if config.data.eval_file else []
    else:
        view = data.sft_view if kind == "sft" else data.dpo_view
        train, evals = view(data.load_examples(split="train")), view(data.load_examples(split="validation"))
    if config.data.get("train_limit", 0):
        train = train[:config.data.train_limit]
    if config.data.get("eval_limit", 0):
        evals = evals[:config.data.eval_limit]
    return train, evals


def encode(rows: list[dict], tokenizer, config, kind: str) -> Data:
    fn = batching.encode_sft if kind == "sft" else batching.encode_dpo
    items, ids, report = fn(tokenizer, rows, config.data.max_length, config.data.too_long)
    return Data(items, ids, report, kind)


# ---- the step -------------------------------------------------------------------------------------


def _forward_logps(module: Gemma3, params, batch, chunk: int) -> losses.ResponseLogps:
    hidden = module.apply({"params": params}, batch["tokens_BT"], positions_from_mask(batch["valid_BT"]),
                          return_hidden=True)
    return losses.response_logps(hidden, params["embedding"], batch["target_idx_BR"], batch["targets_BR"],
                                 batch["target_mask_BR"], chunk=chunk, softcap=module.config.final_logit_softcap)


def compute_dtype(config, param_dtype):
    """The dtype of the forward and backward pass: `config.compute_dtype` (e.g. bfloat16 with float32
    parameters: mixed precision, the optimizer updating float32 master weights), else the parameters'."""
    name = config.get("compute_dtype", "") or ""
    if not name:
        return None
    from kwjax.weights import parse_dtype

    dtype = jnp.dtype(parse_dtype(name))
    return None if dtype == jnp.dtype(param_dtype) else dtype


def _cast(params, dtype):
    """The parameters as the compute dtype sees them (gradients flow back to the master dtype)."""
    if dtype is None:
        return params
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _split_pairs(x):
    half = x.shape[0] // 2
    return x[:half], x[half:]


def make_loss_fn(module: Gemma3, method: str, config) -> Callable:
    """loss(params, micro_batch, ref_params, totals) -> (loss, metrics); totals normalise per step."""
    chunk = config.logprob_chunk
    cdtype = compute_dtype(config, module.param_dtype)

    def loss_fn(params, micro, ref_params, totals):
        lp = _forward_logps(module, _cast(params, cdtype), micro, chunk)
        if method == "sft":
            loss, metrics = losses.sft_loss(lp, micro["example_mask_B"], totals["tokens"])
            return loss, metrics
        if ref_params is not None:  # on-the-fly reference: same module, frozen tree, no gradient
            ref = _forward_logps(module, _cast(jax.lax.stop_gradient(ref_params), cdtype), micro, chunk).logps_B
        else:
            ref = micro["ref_logps_B"]
        pc, pr = _split_pairs(lp.logps_B)
        rc, rr = _split_pairs(ref)
        tc, tr = _split_pairs(lp.num_tokens_B)
        pair_mask = _split_pairs(micro["example_mask_B"])[0]
        d = config.dpo
        loss, metrics = losses.dpo_loss(
            pc, pr, rc, rr, pair_mask, totals["pairs"], beta=d.beta, loss_type=d.loss_type,
            label_smoothing=d.label_smoothing, chosen_tokens_B=jnp.maximum(tc, 1.0),
            rejected_tokens_B=jnp.maximum(tr, 1.0), rpo_alpha=d.rpo_alpha, chosen_nll_sum_B=-pc,
            num_chosen_tokens_total=totals["chosen_tokens"])
        lc, lr_ = _split_pairs(lp.mean_logit_B)
        metrics["logits/chosen"] = jnp.sum(lc * pair_mask) / totals["pairs"]
        metrics["logits/rejected"] = jnp.sum(lr_ * pair_mask) / totals["pairs"]
        metrics["num_tokens"] = jnp.sum((tc + tr) * pair_mask)
        return loss, metrics

    return loss_fn


def _totals(batch, method: str):
    mask = batch["target_mask_BR"].astype(jnp.float32)
    if method == "sft":
        return {"tokens": jnp.maximum(mask.sum(), 1.0)}
    chosen_mask = _split_pairs(mask)[0]
    pairs = _split_pairs(batch["example_mask_B"])[0].astype(jnp.float32).sum()
    return {"pairs": jnp.maximum(pairs, 1.0), "chosen_tokens": jnp.maximum(chosen_mask.sum(), 1.0)}


def _micro_batches(batch, k: int, method: str):
    """[B, ...] -> [k, B/k, ...]; DPO keeps each pair's chosen and rejected rows in one micro-batch."""
    if method == "sft":
        return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def split(x):
        pairs = x.reshape(2, k, x.shape[0] // (2 * k), *x.shape[1:])
        return jnp.concatenate([pairs[0], pairs[1]], axis=1)

    return jax.tree.map(split, batch)


def make_train_step(module, method, config, tx: optimizer.AdamW, lr_schedule, on_the_fly: bool):
    """step(state, batch, ref_params) -> (state, metrics); jit it with the state donated, so that
    `tx.apply` rewrites parameters and moments in place."""
    loss_fn = make_loss_fn(module, method, config)
    k = config.grad_accum

    def step(state, batch, ref_params):
        totals = _totals(batch, method)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        ref = ref_params if on_the_fly else None
        if k == 1:
            (_, metrics), grads = grad_fn(state["params"], batch, ref, totals)
        else:
            def body(carry, micro):
                (_, m), g = grad_fn(state["params"], micro, ref, totals)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            metric_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: loss_fn(state["params"], jax.tree.map(lambda x: x[0], _micro_batches(batch, k, method)),
                                ref, totals)[1]))
            (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), _micro_batches(batch, k, method))
        params, opt_state, grad_norm = tx.apply(grads, state["opt_state"], state["params"])
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state["step"]),
                       param_norm=optax.tree.norm(params))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

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

    def __call__(self, state, batch: dict, *rest):
        key = tuple((name, batch[name].shape) for name in sorted(batch))
        if key not in self.compiled:
            self.compiled[key] = self.jitted.lower(state, batch, *rest).compile()
            release_freed_memory()
        return self.compiled[key](state, batch, *rest)


def make_eval_step(module, method, config, on_the_fly: bool):
    loss_fn = make_loss_fn(module, method, config)

    def step(params, batch, ref_params):
        return loss_fn(params, batch, ref_params if on_the_fly else None, _totals(batch, method))[1]

    return step


# ---- reference log-probs ---------------------------------------------------------------------------


def params_fingerprint(params) -> str:
    """Content hash of a params tree, whatever its sharding (multi-process: every process must call it)."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(distributed.to_host(leaf).tobytes())  # one leaf at a time: host memory stays one leaf
    return h.hexdigest()


def data_fingerprint(data: Data) -> str:
    h = hashlib.blake2b(digest_size=16)
    for row_id, item in zip(data.ids, data.items):
        if data.kind == "sft":
            h.update(json.dumps([row_id, item.prompt, item.response]).encode())
        else:
            c, r = item
            h.update(json.dumps([row_id, c.prompt, c.response, r.prompt, r.response]).encode())
    return h.hexdigest()


def reference_logps(module, params, data: Data, config, mesh, cache_root: Path | None, desc: str) -> np.ndarray:
    """[N, 2] (chosen, rejected) sequence log-probs of the reference, cached on disk by content.

    Multi-process: every process computes its rows of every batch; the log-probs come back replicated,
    so every process holds all [N, 2]. Only process 0 reads and writes the cache (its disk), and tells
    the others whether it found the values, so all processes run the same collectives.
    """
    cdtype = compute_dtype(config, module.param_dtype)
    key = path = None
    if cache_root is not None:
        key = f"{data_fingerprint(data)}-{params_fingerprint(params)}-c{config.logprob_chunk}"
        if cdtype is not None:
            key += f"-{cdtype.name}"
        path = cache_root / f"{key}.npy"
    found = np.load(path) if path is not None and distributed.is_main() and path.is_file() else None
    if distributed.any_process(found is not None):  # process 0 found it: everyone takes its values
        return distributed.broadcast(found if found is not None else np.zeros((len(data.items), 2)))
    fwd = jax.jit(lambda p, b: _forward_logps(module, _cast(p, cdtype), b, config.logprob_chunk).logps_B,
                  out_shardings=sharding.replicated(mesh))
    bsz = config.batch_size
    out = np.zeros((len(data.items), 2), np.float64)
    from tqdm import tqdm

    for start in tqdm(range(0, len(data.items), bsz), desc=desc, unit="batch", leave=False,
                      disable=not distributed.is_main()):
        idx = list(range(start, min(start + bsz, len(data.items))))
        batch = global_batch(data, idx, config, mesh)
        logps = np.asarray(fwd(params, batch))
        out[idx, 0] = logps[:len(idx)]
        out[idx, 1] = logps[bsz:bsz + len(idx)]
    if path is not None and distributed.is_main():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = cache_root / f".{key}.tmp.npy"
        np.save(tmp, out)
        tmp.replace(path)
    return out


def global_batch(data: Data, idx, config, mesh, ref_logps: np.ndarray | None = None) -> dict[str, jax.Array]:
    """The global batch of rows `idx` (padded to config.batch_size), sharded over the mesh's batch axes.

    Every process knows every row, so all agree on the padded lengths; each collates and transfers only
    the rows its own devices hold. `ref_logps` ([N, 2] cached reference log-probs) adds `ref_logps_B`,
    laid out like the stacked pairs.
    """
    rows = data.rows(idx, config.batch_size)
    seq_len, resp_len = batching.padded_lengths(rows, config.data.length_bucket)
    local = distributed.process_rows(mesh, len(rows))
    host = batching.collate_rows([rows[i] for i in local], seq_len, resp_len)
    if ref_logps is not None:
        ref = np.zeros(len(rows), np.float32)
        ref[:len(idx)] = ref_logps[idx, 0]
        ref[config.batch_size:config.batch_size + len(idx)] = ref_logps[idx, 1]
        host["ref_logps_B"] = ref[local]
    return distributed.global_batch(mesh, host, len(rows))


# ---- the loop --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    workdir: Path
    final_step: int
    params: Any
    metrics: list[dict]
    interrupted: bool = False


class _StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def validate_config(config, method: str) -> None:
    if method not in ("sft", "dpo"):
        raise TrainingError(f"unknown method {method!r}; expected one of {METHODS}")
    if config.batch_size <= 0 or config.epochs <= 0:
        raise TrainingError(f"batch_size and epochs must be positive (got {config.batch_size}, {config.epochs})")
    if config.grad_accum <= 0 or config.batch_size % config.grad_accum:
        raise TrainingError(f"batch_size {config.batch_size} must divide by grad_accum {config.grad_accum}")
    if config.dpo.loss_type not in losses.LOSS_TYPES:
        raise TrainingError(f"dpo.loss_type is {config.dpo.loss_type!r}; expected one of {losses.LOSS_TYPES}")
    if config.dpo.reference not in ("precomputed", "on_the_fly"):
        raise TrainingError(f"dpo.reference is {config.dpo.reference!r}; expected precomputed or on_the_fly")
    if config.data.too_long not in batching.TOO_LONG:
        raise TrainingError(f"data.too_long is {config.data.too_long!r}; expected one of {batching.TOO_LONG}")


def train(config, method: str, workdir: str | Path, model: LoadedModel, *, ref_params=None,
          resume: bool = False, progress: bool = True, devices=None, interrupt_at: int | None = None,
          checkpoint_dir: str | Path | None = None) -> Result:
    """Trains `model` with SFT or DPO. The reference (DPO) is `ref_params`, else the starting weights.

    `model.params` is donated to the first train step (no second copy of the model is kept): use
    `Result.params` afterwards. `interrupt_at` acts as a Ctrl-C arriving during that step (tests).
    Checkpoints go to `checkpoint_dir` (a path, or a gs:// URL), by default WORKDIR/checkpoints.

    Multi-process (after `kwjax.distributed.initialize()`), every process calls this with the same
    arguments; `model` is each process's own copy of the same weights (checked).
    """
    validate_config(config, method)
    workdir = Path(workdir)
    ckpt_dir = checkpoint_dir if checkpoint_dir is not None else workdir / "checkpoints"
    if "://" not in str(ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    divisor = sharding.batch_divisor(mesh) * config.grad_accum
    if config.batch_size % divisor:
        where = ""
        if distributed.is_multiprocess():
            where = (f" ({jax.process_count()} processes × {jax.local_device_count()} local devices; set "
                     f"batch_size to a multiple of {divisor})")
        raise TrainingError(f"batch_size {config.batch_size} does not divide over the mesh: data×fsdp = "
                            f"{sharding.batch_divisor(mesh)} devices × grad_accum {config.grad_accum}{where}")

    distributed.check_shared_dir(ckpt_dir, "the checkpoint directory")  # before any work (multi-process)

    kind = "sft" if method == "sft" else "dpo"
    train_rows, eval_rows = load_rows(config, kind)
    train_data = encode(train_rows, model.tokenizer, config, kind)
    eval_data = encode(eval_rows, model.tokenizer, config, kind) if eval_rows else None
    log.info("train data: %s", train_data.report.summary())
    if distributed.is_multiprocess():  # the same settings, data and weights everywhere, or a clear error
        distributed.all_equal({"config": distributed.digest(config.to_json_best_effort(sort_keys=True)),
                               "training data": distributed.digest(data_fingerprint(train_data)),
                               "evaluation data": distributed.digest(data_fingerprint(eval_data) if eval_data
                                                                     else "none")},
                              "the configuration or the data")
        distributed.all_equal({**distributed.params_digests(model.params),
                               **{f"reference {k}": v for k, v in distributed.params_digests(ref_params or {}).items()}},
                              "the starting weights")
    if distributed.is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        reports = {"train": dataclasses.asdict(train_data.report),
                   "eval": dataclasses.asdict(eval_data.report) if eval_data else None,
                   "max_length": config.data.max_length, "too_long": config.data.too_long}
        (workdir / "data_report.json").write_text(json.dumps(reports, indent=2))
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
    tx, lr_schedule = optimizer.make(config.optimizer, peak_lr, total_steps, params)

    on_the_fly = method == "dpo" and config.dpo.reference == "on_the_fly"
    ref_tree = None
    ref_cache = {}
    if method == "dpo":
        reference = params if ref_params is None else distributed.put_global(ref_params, p_shard)
        if on_the_fly:  # a copy: the policy's buffers are donated to the train step
            ref_tree = jax.tree.map(jnp.copy, reference)
        else:
            from kwjax.paths import cache_dir

            root = cache_dir() / "reference_logps"
            ref_cache["train"] = reference_logps(module, reference, train_data, config, mesh, root, "reference (train)")
            if eval_data is not None:
                ref_cache["eval"] = reference_logps(module, reference, eval_data, config, mesh, root, "reference (eval)")
            del reference

    # The optimizer state is created under jit with the parameters' shardings.
    # Donated: the state takes over the parameter buffers instead of holding a second copy for the whole run.
    state = jax.jit(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)},
                    donate_argnums=(0,))(params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    checkpointer = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        if not resume:
            raise TrainingError(f"{ckpt_dir} already holds checkpoints (latest step {latest}); pass --resume to "
                                "continue that run, or choose a new --workdir")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, meta = checkpointer.restore(latest, abstract)
        if meta.get("method") != method:
            raise TrainingError(f"{ckpt_dir}: checkpoint is from a {meta.get('method')} run, not {method}")
        start_step = int(meta["step"])
        log.info("resumed from step %d", start_step)

    step_fn = CompiledSteps(jax.jit(make_train_step(module, method, config, tx, lr_schedule, on_the_fly),
                                    in_shardings=(state_shardings, None, p_shard if on_the_fly else None),
                                    out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,)))
    # metrics come back replicated: every process reads them (np.asarray of a sharded array fails there)
    eval_fn = jax.jit(make_eval_step(module, method, config, on_the_fly), out_shardings=sharding.replicated(mesh))
    writer = MetricsWriter(workdir, enabled=distributed.is_main())
    history: list[dict] = []

    def meta(step: int) -> dict:
        return {"step": step, "epoch": step // steps_per_epoch, "seed": config.seed, "method": method,
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}

    def batch_for(step: int) -> dict[str, jax.Array]:
        epoch, pos = divmod(step, steps_per_epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_data.items))
        idx = order[pos * config.batch_size:(pos + 1) * config.batch_size]
        return global_batch(train_data, idx, config, mesh, ref_cache.get("train"))

    def evaluate(step: int) -> dict:
        if eval_data is None:
            return {}
        sums: dict[str, float] = {}
        weight_total = 0.0
        for start in range(0, len(eval_data.items), config.batch_size):
            idx = list(range(start, min(start + config.batch_size, len(eval_data.items))))
            batch = global_batch(eval_data, idx, config, mesh, ref_cache.get("eval"))
            # SFT: weighted by response tokens (the batch's target_mask sum), DPO: by pairs
            weight = float(sum(len(eval_data.items[i].response) for i in idx)) if method == "sft" else float(len(idx))
            m = jax.device_get(eval_fn(state["params"], batch, ref_tree))
            for k, v in m.items():
                scale = 1.0 if k == "num_tokens" else weight
                sums[k] = sums.get(k, 0.0) + float(v) * scale
            weight_total += weight
        out = {f"eval_{k}": (v if k == "num_tokens" else v / weight_total) for k, v in sums.items()}
        if method == "sft":
            out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
        writer.write(step, out, epoch=step / steps_per_epoch)
        history.append({"step": step, **out})
        return out

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc=method, unit="step",
               disable=not progress or not distributed.is_main(), dynamic_ncols=True)
    step = start_step
    interrupted = False
    last_saved = latest if latest is not None else None
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                batch = batch_for(step)
                state, metrics = step_fn(state, batch, ref_tree)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(metrics[k])]
                if bad:  # the updated parameters may be poisoned too: never checkpoint this state
                    kept = _what_is_kept(last_saved, f" in {ckpt_dir}")
                    raise TrainingError(f"{bad[0]} is {metrics[bad[0]]} at step {step + 1} (loss "
                                        f"{metrics['loss']}); training stopped and this state was not saved; {kept}")
                step += 1
                metrics["epoch"] = step / steps_per_epoch
                if step % config.log_every == 0 or step == total_steps:
                    writer.write(step, metrics)
                history.append({"step": step, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                bar.update(1)
                if interrupt_at is not None and step == interrupt_at:
                    stop.signal = signal.SIGINT
                # A signal may reach one host only (Ctrl-C, a preempted worker): all processes stop together.
                stopping = distributed.any_process(stop.signal is not None)
                if step % steps_per_epoch == 0 or step == total_steps:
                    evaluate(step)
                if step % config.checkpoint_every == 0 or step == total_steps or stopping:
                    _save_checkpoint(checkpointer, step, state, meta(step), last_saved)
                    last_saved = step
                if stopping:
                    interrupted = True
                    log.warning("stopped by %s at step %d; checkpoint saved, resume with --resume",
                                f"signal {stop.signal}" if stop.signal is not None else "a signal to another process",
                                step)
                    break
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    return Result(workdir, step, state["params"], history, interrupted)


def _save_checkpoint(checkpointer: Checkpointer, step: int, state, meta: dict, last_saved: int | None) -> None:
    """A save that fails (a full disk, a lost bucket) leaves the earlier checkpoints as they were: Orbax
    writes into a temporary directory and renames only a complete one. The error says what is left."""
    try:
        checkpointer.save(step, state, meta)
    except (OSError, ValueError) as e:  # TensorStore reports I/O errors as ValueError
        raise TrainingError(f"could not save the checkpoint of step {step} in {checkpointer.directory}: {e}; "
                            f"{_what_is_kept(last_saved)}; once the cause is fixed, rerun with --resume") from e


def _what_is_kept(last_saved: int | None, where: str = "") -> str:
    """The end of a stopped run's error: the checkpoint a --resume would start from."""
    if last_saved is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_saved}) is kept{where}"


# ---- whole runs --------------------------------------------------------------------------------------


def load_model(config) -> LoadedModel:
    """The configured model; "tiny" is a random few-layer Gemma 3 around the embedded tokenizer (tests, CI)."""
    import kwjax
    from kwjax import config as cfglib

    if config.model == "tiny":
        from kwjax.paths import embedded_gguf_path
        from kwjax.tokenizer import load_tokenizer

        tok = load_tokenizer(embedded_gguf_path())
        mcfg = cfglib.tiny(vocab_size=tok.vocab_size, sliding_window=32, num_layers=3)
        params = kwjax.model.init_params(mcfg, jax.random.PRNGKey(config.seed))
        params = {**params, "embedding": params["embedding"] * 0.05}
        return LoadedModel(mcfg, params, tok, "tiny")
    return kwjax.load(config.model, dtype=config.dtype)


def finish(result: Result, model: LoadedModel, config) -> None:
    """The final model as a kwjax model directory and, if configured, a Hugging Face directory.

    Multi-process: every process takes part in gathering the parameters (a collective, one tensor at a
    time); process 0 alone writes both directories, on its own disk.
    """
    from kwjax.weights import export_hf, save_native

    params = result.params
    if distributed.is_multiprocess():
        gathered = {}
        for keys, leaf in jax.tree_util.tree_leaves_with_path(params):
            host = distributed.to_host(leaf)
            if distributed.is_main():
                gathered[keys] = host
        if not distributed.is_main():
            return
        params = jax.tree_util.tree_map_with_path(lambda keys, _: gathered[keys], params)
    final = LoadedModel(model.config, params, model.tokenizer, str(result.workdir))
    save_native(final, result.workdir / "model")
    if config.export_hf:
        export_hf(final, result.workdir / "hf")


def run(config, method: str, workdir: str | Path, *, resume: bool = False, progress: bool = True,
        checkpoint_dir: str | None = None) -> dict:
    """One command's worth of training: sft, dpo, or sft_dpo (SFT, then DPO from and against the SFT model).

    `checkpoint_dir` (a path or gs:// URL; sft_dpo adds /sft and /dpo) replaces WORKDIR/checkpoints, e.g.
    a bucket all hosts of a multi-host slice share. Multi-process, every process calls this alike.
    """
    if method not in METHODS:
        raise TrainingError(f"unknown method {method!r}; expected one of {METHODS}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = load_model(config)
    stages = ["sft", "dpo"] if method == "sft_dpo" else [method]
    summary = {}
    ref_params = None
    for stage in stages:
        stage_dir = workdir / stage if method == "sft_dpo" else workdir
        stage_ckpt = None
        if checkpoint_dir:
            stage_ckpt = f"{str(checkpoint_dir).rstrip('/')}/{stage}" if method == "sft_dpo" else str(checkpoint_dir)
        done = stage_dir / "model" / "kwjax.json"
        if method == "sft_dpo" and stage == "sft" and distributed.is_multiprocess():
            seen = distributed.gather_values(np.int32(done.is_file()))
            if seen.min() != seen.max():
                raise TrainingError(f"{done.parent}: the finished SFT model is on processes "
                                    f"{np.nonzero(seen)[0].tolist()} only; on a multi-host slice copy it to every "
                                    "worker (or delete it everywhere to train SFT again)")
        if method == "sft_dpo" and stage == "sft" and done.is_file() and not resume:
            raise TrainingError(f"{stage_dir} already holds a finished SFT model; pass --resume to reuse it, "
                                "or choose a new --workdir")
        if method == "sft_dpo" and stage == "sft" and done.is_file():
            import kwjax

            finished = kwjax.load(stage_dir / "model", dtype=config.dtype)
            model = LoadedModel(model.config, finished.params, model.tokenizer, str(stage_dir))
            ref_params = finished.params
            summary[stage] = {"workdir": str(stage_dir), "reused": True}
            continue
        started = time.time()
        result = train(config, stage, stage_dir, model, ref_params=ref_params, resume=resume, progress=progress,
                       checkpoint_dir=stage_ckpt)
        summary[stage] = {"workdir": str(stage_dir), "final_step": result.final_step,
                          "seconds": round(time.time() - started, 1), "interrupted": result.interrupted,
                          "last": result.metrics[-1] if result.metrics else {}}
        if result.interrupted:
            return summary
        finish(result, model, config)
        model = LoadedModel(model.config, result.params, model.tokenizer, str(stage_dir))
        ref_params = result.params  # SFT -> DPO: the SFT model is both the start and the reference
    return summary
