"""Whole runs: a method is a chain of training stages, each starting from the previous stage's model.

  sft      one SFT stage from the base model
  dpo      one preference stage from the base model (reference: the base model)
  sft_dpo  SFT, then a preference stage from the SFT model, against the SFT model as its reference

`run_chain` is the one place that chains stages; `scripts/train.py` (through `run`) and the experiment
both call it, each naming its stage directories. A finished stage (its `model/` written) is reused,
not trained again, when the run resumes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from kwjax import distributed
from kwjax.files import atomic_write_text
from kwjax.prepare import TrainingError
from kwjax.train import Result, train
from kwjax.weights import LoadedModel

METHODS = ("sft", "dpo", "sft_dpo")
CHAINS = {"sft": ("sft",), "dpo": ("dpo",), "sft_dpo": ("sft", "dpo")}


@dataclasses.dataclass(frozen=True)
class Stage:
    method: str  # what this stage trains: "sft" or "dpo"
    directory: Path  # its workdir: checkpoints, metrics, model/ (and hf/) when finished
    checkpoint_dir: str | None = None  # instead of DIRECTORY/checkpoints (e.g. a gs:// bucket)


def layout(method: str, workdir: str | Path, checkpoint_dir: str | None = None) -> list[Stage]:
    """`scripts/train.py`'s directories: WORKDIR for one stage; WORKDIR/sft and WORKDIR/dpo for sft_dpo."""
    if method not in METHODS:
        raise TrainingError(f"unknown method {method!r}; expected one of {METHODS}")
    workdir = Path(workdir)
    chain = CHAINS[method]
    if len(chain) == 1:
        return [Stage(method, workdir, str(checkpoint_dir) if checkpoint_dir else None)]
    root = str(checkpoint_dir).rstrip("/") if checkpoint_dir else None
    return [Stage(m, workdir / m, f"{root}/{m}" if root else None) for m in chain]


def experiment_layout(method: str, train_root: Path) -> list[Stage]:
    """The experiment's directories: every method's last stage in TRAIN_ROOT/<method>, and sft_dpo's
    SFT stage is the seed's own SFT run (TRAIN_ROOT/sft), trained once and shared."""
    if method not in METHODS:
        raise TrainingError(f"unknown method {method!r}; expected one of {METHODS}")
    chain = CHAINS[method]
    return [Stage(m, train_root / m) for m in chain[:-1]] + [Stage(chain[-1], train_root / method)]


def load_model(config) -> LoadedModel:
    """The configured model; "tiny" is a random few-layer Gemma 3 around the embedded tokenizer (tests, CI)."""
    import kwjax
    from kwjax.models.gemma3 import config as cfglib

    if config.model == "tiny":
        from kwjax.paths import embedded_gguf_path
        from kwjax.tokenizer import load_tokenizer

        tok = load_tokenizer(embedded_gguf_path())
        mcfg = cfglib.tiny(vocab_size=tok.vocab_size, sliding_window=32, num_layers=3)
        params = kwjax.models.gemma3.model.init_params(mcfg, jax.random.PRNGKey(config.seed))
        params = {**params, "embedding": params["embedding"] * 0.05}
        return LoadedModel(mcfg, params, tok, "tiny")
    return kwjax.load(config.model, dtype=config.dtype)


def finish(result: Result, model: LoadedModel, config) -> LoadedModel:
    """The final model as a kwjax model directory and, if configured, a Hugging Face directory.

    Multi-process: every process takes part in gathering the parameters (a collective, one tensor at a
    time); process 0 alone writes both directories, on its own disk. Returns the trained model.
    """
    from kwjax.weights import export_hf, save_native

    trained = LoadedModel(model.config, result.params, model.tokenizer, str(result.workdir))
    params = result.params
    if distributed.is_multiprocess():
        gathered = {}
        for keys, leaf in jax.tree_util.tree_leaves_with_path(params):
            host = distributed.to_host(leaf)
            if distributed.is_main():
                gathered[keys] = host
        if not distributed.is_main():
            return trained
        params = jax.tree_util.tree_map_with_path(lambda keys, _: gathered[keys], params)
    final = LoadedModel(model.config, params, model.tokenizer, str(result.workdir))
    save_native(final, result.workdir / "model")
    if config.export_hf:
        export_hf(final, result.workdir / "hf")
    return trained


def _finished(stage: Stage) -> bool:
    """Whether the stage's model is written; multi-process, every process must agree."""
    done = (stage.directory / "model" / "kwjax.json").is_file()
    if distributed.is_multiprocess():
        seen = distributed.gather_values(np.int32(done))
        if seen.min() != seen.max():
            raise TrainingError(f"{stage.directory / 'model'}: the finished {stage.method} model is on processes "
                                f"{np.nonzero(seen)[0].tolist()} only; on a multi-host slice copy it to every "
                                "worker (or delete it everywhere to train that stage again)")
    return done


def run_chain(config, stages: list[Stage], *, resume: bool = False, progress: bool = True,
              start: LoadedModel | None = None) -> dict:
    """Trains the stages in order; each starts from the previous one's model, which is also its reference.

    The first stage starts from `start`, else the configured model. A finished stage before the last is
    reused with `resume` (and refused without it, so nothing is silently skipped). Returns a summary per
    stage method; it stops after a stage that a signal interrupted (its checkpoint is saved).
    """
    model = start
    ref_params = None
    summary: dict = {}
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        if not last and _finished(stage):
            if not resume:
                raise TrainingError(f"{stage.directory} already holds a finished {stage.method.upper()} model; "
                                    "pass --resume to reuse it, or choose a new --workdir")
            import kwjax

            model = kwjax.load(stage.directory / "model", dtype=config.dtype)
            ref_params = model.params
            summary[stage.method] = {"workdir": str(stage.directory), "reused": True}
            continue
        started = time.time()
        if model is None:
            model = load_model(config)
        loaded = time.time() - started
        result = train(config, stage.method, stage.directory, model, ref_params=ref_params, resume=resume,
                       progress=progress, checkpoint_dir=stage.checkpoint_dir,
                       on_epoch=epoch_hook(config, stage, model))
        timings = {"load": round(loaded, 2), **result.timings}
        summary[stage.method] = {"workdir": str(stage.directory), "final_step": result.final_step,
                                 "seconds": round(time.time() - started, 1), "interrupted": result.interrupted,
                                 "last": result.metrics[-1] if result.metrics else {}, "timings": timings}
        if result.interrupted:
            return summary
        exporting = time.time()
        model = finish(result, model, config)
        timings["export"] = round(time.time() - exporting, 2)
        ref_params = result.params  # the next stage starts from this model and is referenced against it
    return summary


def epoch_hook(config, stage: Stage, model: LoadedModel):
    """The stage's per-epoch generation check (`evaluate.epoch_hook`) when `config.eval.every_epoch` asks
    for one: greedy outputs for that many validation prompts after every epoch. Single-process only.
    A stage's own `every_epoch` (`config.sft` / `config.dpo`), when >= 0, wins: the checks answer "when
    does SFT start or stop looping" and cost a DPO stage a tenth of its time."""
    own = (config.get(stage.method) or {}).get("every_epoch", -1)
    n = own if own is not None and own >= 0 else config.eval.get("every_epoch", 0)
    if not n:
        return None
    if distributed.is_multiprocess():
        import logging

        logging.getLogger(__name__).warning("eval.every_epoch is ignored in a multi-process run")
        return None
    from kwjax import data as datalib
    from kwjax import evaluate as evallib

    e = config.eval
    settings = evallib.EvalSettings(max_new_tokens=e.max_new_tokens, num_samples=0, seed=config.seed,
                                    batch_size=e.batch_size, max_length=config.data.max_length)
    return evallib.epoch_hook(model, datalib.validation_rows(config, "dpo", n), settings, stage.directory)


def run(config, method: str, workdir: str | Path, *, resume: bool = False, progress: bool = True,
        checkpoint_dir: str | None = None) -> dict:
    """One command's worth of training (`scripts/train.py`): `method`'s stages under `workdir`.

    `checkpoint_dir` (a path or gs:// URL; sft_dpo adds /sft and /dpo) replaces WORKDIR/checkpoints, e.g.
    a bucket all hosts of a multi-host slice share. Multi-process, every process calls this alike.
    """
    stages = layout(method, workdir, checkpoint_dir)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    return run_chain(config, stages, resume=resume, progress=progress)
