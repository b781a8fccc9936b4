"""The training loop: steps, evaluation each epoch, checkpoints, metrics, a clean stop on a signal.

Everything the loop runs on is built by `kwjax.prepare.prepare` (mesh, data, trainable and frozen
trees, optimizer, reference, jitted steps); chains of stages (SFT→DPO) and exports are
`kwjax.stages`.

A run is reproducible and resumable: the data order of epoch e is a permutation seeded by (seed, e),
and a checkpoint records the step, so `--resume` continues with exactly the batches an uninterrupted
run would have seen. Checkpoints hold the trainable tree and its optimizer state; they record which
parameters were frozen, and a resume with another split is refused.

The same code runs multi-process (a Cloud TPU slice; `kwjax.distributed`): every process builds the
same global batch order and collates only the rows its own devices hold; evaluation runs on the same
sharded batches with its results replicated to every process; Orbax checkpoints are written by all
processes; metrics, progress and reports come from process 0 (tests/test_multiprocess.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax

from kwjax import distributed, feed
from kwjax.checkpoint import Checkpointer
from kwjax.partition import describe_text
from kwjax.prepare import Prepared, TrainingError, prepare
from kwjax.tracking import MetricsWriter
from kwjax.weights import LoadedModel

log = logging.getLogger(__name__)
EpochHook = Callable[[int, int, Any], "dict | None"]  # (epoch, step, whole-model params) -> metrics


@dataclasses.dataclass
class Result:
    workdir: Path
    final_step: int
    params: Any
    metrics: list[dict]
    interrupted: bool = False
    # Wall seconds by phase: prepare (data, reference pass, state), compile, steps, evaluation (the
    # eval split and the on_epoch hook), save (checkpoints); so a speed-up is aimed where the time goes.
    timings: dict = dataclasses.field(default_factory=dict)


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


def train(config, method: str, workdir: str | Path, model: LoadedModel, *, ref_params=None,
          resume: bool = False, progress: bool = True, devices=None, interrupt_at: int | None = None,
          checkpoint_dir: str | Path | None = None, on_epoch: EpochHook | None = None) -> Result:
    """Trains `model` with SFT or DPO. The reference (DPO) is `ref_params`, else the starting weights.

    `model.params` is donated to the first train step (no second copy of the model is kept): use
    `Result.params` afterwards. `interrupt_at` acts as a Ctrl-C arriving during that step (tests).
    Checkpoints go to `checkpoint_dir` (a path, or a gs:// URL), by default WORKDIR/checkpoints.

    Multi-process (after `kwjax.distributed.initialize()`), every process calls this with the same
    arguments; `model` is each process's own copy of the same weights (checked).

    `on_epoch(epoch, step, params)` runs after each epoch's evaluation with the whole model's current
    parameters (e.g. generation metrics per epoch); the metrics it returns are logged with the step's.
    """
    workdir = Path(workdir)
    ckpt_dir = checkpoint_dir if checkpoint_dir is not None else workdir / "checkpoints"
    if "://" not in str(ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
    distributed.check_shared_dir(ckpt_dir, "the checkpoint directory")  # before any work (multi-process)
    clock = _Clock()
    with clock("prepare"):
        run = prepare(config, method, model, ref_params=ref_params, devices=devices, report_dir=workdir)
    checkpointer = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        if not resume:
            checkpointer.close()
            raise TrainingError(f"{ckpt_dir} already holds checkpoints (latest step {latest}); pass --resume to "
                                "continue that run, or choose a new --workdir")
        with clock("prepare"):
            run.state, start_step = _restore(checkpointer, latest, run, ckpt_dir)
        log.info("resumed from step %d", start_step)
    writer = MetricsWriter(workdir, enabled=distributed.is_main())
    history: list[dict] = []
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps

    def meta(step: int) -> dict:
        return {"step": step, "epoch": step // steps_per_epoch, "seed": config.seed, "method": method,
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "partition": run.partition.describe()}

    def evaluate(step: int) -> None:
        out = evaluate_split(run) if run.eval_data is not None else {}
        if on_epoch is not None:
            out.update(on_epoch(math.ceil(step / steps_per_epoch), step, run.params()) or {})
        if out:
            writer.write(step, out, epoch=step / steps_per_epoch)
            history.append({"step": step, **out})

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc=method, unit="step",
               disable=not progress or not distributed.is_main(), dynamic_ncols=True)
    step = start_step
    interrupted = False
    last_saved = latest if latest is not None else None
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                started, compiling = time.perf_counter(), run.step_fn.compile_seconds
                tokens = run.train_data.tokens(run.train_indices(step))
                run.state, metrics = run.step_fn(run.state, run.train_batch(step), run.ref, run.frozen)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                compiled = run.step_fn.compile_seconds - compiling
                seconds = time.perf_counter() - started - compiled
                clock.add("compile", compiled)
                clock.add("steps", seconds)
                metrics.update(step_seconds=seconds, tokens_per_second=tokens / seconds)
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
                    with clock("evaluation"):
                        evaluate(step)
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total_steps or stopping:
                    with clock("save"):
                        _save_checkpoint(checkpointer, step, run.state, meta(step), last_saved)
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
        with clock("save"):  # waits for an asynchronous save to land
            checkpointer.close()
    return Result(workdir, step, run.params(), history, interrupted, clock.rounded())


class _Clock:
    """Wall seconds per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def rounded(self) -> dict:
        return {k: round(v, 2) for k, v in self.seconds.items()}


def evaluate_split(run: Prepared) -> dict:
    """The eval split's metrics (`eval_` prefixed): SFT weighted by response tokens, DPO by pairs."""
    sums: dict[str, float] = {}
    weight_total = 0.0
    for idx in feed.batches(run.eval_data, run.config.batch_size):
        weight = run.eval_data.weight(idx)
        m = jax.device_get(run.eval_fn(run.state["params"], run.batch("eval", idx), run.ref, run.frozen))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k == "num_tokens" else weight)
        weight_total += weight
    out = {f"eval_{k}": (v if k == "num_tokens" else v / weight_total) for k, v in sums.items()}
    if run.method == "sft":
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out


def _restore(checkpointer: Checkpointer, step: int, run: Prepared, ckpt_dir) -> tuple[dict, int]:
    """The checkpointed state, after checking it is one this run can continue: same method, same split
    into trainable and frozen parameters (the trees would not match otherwise)."""
    meta = checkpointer.read_meta(step)
    if meta.get("method") != run.method:
        raise TrainingError(f"{ckpt_dir}: checkpoint is from a {meta.get('method')} run, not {run.method}")
    saved = meta.get("partition", {"freeze": []})  # checkpoints from before the split was recorded
    if saved != run.partition.describe():
        raise TrainingError(f"{ckpt_dir}: checkpoint was trained with {describe_text(saved)}, this run has "
                            f"{describe_text(run.partition.describe())}; set the same to resume, or choose a "
                            "new --workdir (nothing was overwritten)")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
    state, meta = checkpointer.restore(step, abstract)
    return state, int(meta["step"])


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


