"""Helper for tests/test_multiprocess.py: the same SFT and DPO runs as 2 JAX processes or as 1.

    python tests/_multiprocess_worker.py multi OUT_DIR     (KWJAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set)
    python tests/_multiprocess_worker.py single OUT_DIR

`multi`: one of 2 processes with 2 CPU devices each, joined through a coordinator on 127.0.0.1 (gloo
collectives); `single`: one process with 4 CPU devices. Both build the same meshes over 4 devices, so the
partitioning is identical and only the process boundary differs:

* SFT on mesh (data 1, fsdp 2, tensor 2): each process's devices hold half the batch rows, each row twice
  (tensor), and the parameters are split across the processes. 3 steps over 2 epochs (the data order of
  the second epoch is exercised); the 2-process run is stopped after step 2 by a "signal" that reaches
  process 1 only, so both processes must stop together and save the step-2 checkpoint. The 1-process
  worker then resumes that 2-process checkpoint for step 3.
* DPO on mesh (2, 2, 1), precomputed reference: the stacked [chosen; rejected] rows put all chosen rows on
  process 0 and all rejected rows on process 1. `train.run` (the CLI's entry point): 2 steps, the
  end-of-epoch evaluation and the exports (kwjax + Hugging Face directories, written by process 0, which
  are then the run's parameters: the 1-process worker records them in memory). Then the reference pass
  runs again:
  process 0 finds it in its cache and process 1 (own, empty cache) must take process 0's values without
  computing anything.

Process 0 writes OUT_DIR/multi.npz (SFT's per-step metrics and gathered parameters) and every process
OUT_DIR/multi_<i>.json (what it saw); the single worker writes single.npz / single.json. The data files
(OUT_DIR/data/{sft,dpo}_{train,eval}.jsonl) are written by the test beforehand.
"""

from __future__ import annotations

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("2" if MODE == "multi" else "4")).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import pathlib  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kwjax import distributed  # noqa: E402

distributed.initialize()  # from KWJAX_* (multi); a no-op for the single worker

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kwjax import data as datalib, feed, reference as reflib, sharding, stages  # noqa: E402
from kwjax import step as steplib  # noqa: E402
from kwjax import train as trainlib  # noqa: E402
from kwjax.checkpoint import Checkpointer  # noqa: E402
from kwjax.models.gemma3.model import Gemma3  # noqa: E402

MESHES = {"sft": (1, 2, 2), "dpo": (2, 2, 1)}
SFT_STEPS, DPO_STEPS, INTERRUPT_AT = 3, 2, 2


def make_config(out: pathlib.Path, kind: str):
    c = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    c.batch_size = 8  # 16 training rows: 2 steps per epoch
    c.epochs = 2
    c.max_steps = SFT_STEPS if kind == "sft" else DPO_STEPS
    c.checkpoint_every = 2
    c.export_hf = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = MESHES[kind]
    c.data.train_file = str(out / "data" / f"{kind}_train.jsonl")
    c.data.eval_file = str(out / "data" / f"{kind}_eval.jsonl")
    c.data.max_length, c.data.length_bucket = 48, 16  # responses truncated: one compiled shape, fast
    return c


def record(arrays: dict, prefix: str, result) -> None:
    steps = [h for h in result.metrics if "loss" in h]
    evals = [h for h in result.metrics if "eval_loss" in h]
    arrays[f"{prefix}/loss"] = np.array([h["loss"] for h in steps], np.float64)
    arrays[f"{prefix}/grad_norm"] = np.array([h["grad_norm"] for h in steps], np.float64)
    arrays[f"{prefix}/eval_loss"] = np.array([h["eval_loss"] for h in evals], np.float64)


def record_params(arrays: dict, prefix: str, params) -> None:
    for keys, leaf in jax.tree_util.tree_leaves_with_path(params):
        host = distributed.to_host(leaf)  # a collective: every process calls it
        arrays[f"{prefix}/params/{sharding.param_path(keys)}"] = host


def restore_state(directory: pathlib.Path, step: int, config, sharding_):
    """A checkpoint's train state, restored onto `sharding_` (the way train() restores, any device count)."""
    import jax.numpy as jnp

    from kwjax import optimizer

    params = jax.eval_shape(lambda: stages.load_model(config).params)
    tx, _ = optimizer.make(config.optimizer, 1e-3, 10, params)
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), shapes)
    ckpt = Checkpointer(directory)
    try:
        return ckpt.restore(step, abstract)
    finally:
        ckpt.close()


def run_multi(out: pathlib.Path) -> None:
    pid = jax.process_index()
    report: dict = {"process": pid, "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
                    "devices": jax.device_count(), "timings": {}}
    arrays: dict = {}
    os.environ["KWJAX_CACHE"] = str(out / f"cache{pid}")  # each process its own "disk"

    # what each process feeds: the rows of the global batches its devices hold
    report["rows"] = {k: distributed.process_rows(sharding.make_mesh(*m), 8 if k == "sft" else 16).tolist()
                      for k, m in MESHES.items()}
    # errors every process must raise alike (and no process may hang in)
    bad = make_config(out, "dpo")  # 4 batch rows... over data×fsdp = 4 devices: 6 does not split
    bad.batch_size = 6
    try:
        trainlib.train(bad, "sft", out / "bad", None, progress=False)
    except trainlib.TrainingError as e:
        report["batch_error"] = str(e)
    try:
        distributed.check_shared_dir(out / f"own_dir_{pid}", "the test directory")
    except distributed.DistributedError as e:
        report["shared_error"] = str(e)
    try:
        distributed.all_equal({"value": distributed.digest(f"process {pid}")}, "the test values")
    except distributed.DistributedError as e:
        report["equal_error"] = str(e)

    started = time.time()
    config = make_config(out, "sft")
    result = trainlib.train(config, "sft", out / "multi" / "sft", stages.load_model(config), progress=False,
                            interrupt_at=INTERRUPT_AT if pid == 1 else None)
    report["timings"]["sft"] = round(time.time() - started, 1)
    report["sft"] = {"final_step": result.final_step, "interrupted": result.interrupted}
    record(arrays, "sft", result)
    record_params(arrays, "sft", result.params)
    del result

    # DPO through the whole-run entry point (what scripts/train.py calls): training, then the exports
    started = time.time()
    config = make_config(out, "dpo")
    config.export_hf = True
    summary = stages.run(config, "dpo", out / "multi" / "dpo", progress=False)
    report["timings"]["dpo"] = round(time.time() - started, 1)
    report["dpo"] = {"final_step": summary["dpo"]["final_step"], "interrupted": summary["dpo"]["interrupted"]}

    # The reference pass again: a cache hit on process 0 only. Count forward passes traced meanwhile.
    traced = []
    original = steplib.forward_logps

    def counting(*args, **kwargs):
        traced.append(1)
        return original(*args, **kwargs)

    steplib.forward_logps = counting
    try:
        fresh = stages.load_model(config)
        mesh = sharding.make_mesh(*MESHES["dpo"])
        params = distributed.put_global(fresh.params, sharding.param_shardings(fresh.params, mesh))
        rows, _ = datalib.split_rows(config, "dpo")
        data = feed.encode(rows, fresh.tokenizer, config, "dpo")
        module = Gemma3(fresh.config, param_dtype=fresh.dtype)
        from kwjax.paths import cache_dir

        again = reflib.reference_logps(module, params, data, config, mesh, cache_dir() / "reference_logps", "again")
    finally:
        steplib.forward_logps = original
    report["reference_again_traced"] = len(traced)
    arrays["reference_again"] = again
    report["cache_files"] = sorted(p.name for p in (out / f"cache{pid}").rglob("*.npy"))

    (out / f"multi_{pid}.json").write_text(json.dumps(report, indent=1))
    if distributed.is_main():
        np.savez(out / "multi.npz", **arrays)
    distributed.barrier("kwjax-test-done")
    if distributed.is_main():
        (out / "multi_done").write_text("ok")


def run_single(out: pathlib.Path) -> None:
    report: dict = {"devices": jax.device_count(), "timings": {}}
    arrays: dict = {}
    os.environ["KWJAX_CACHE"] = str(out / "cache_single")

    started = time.time()
    config = make_config(out, "sft")
    result = trainlib.train(config, "sft", out / "single" / "sft", stages.load_model(config), progress=False)
    report["timings"]["sft"] = round(time.time() - started, 1)
    assert result.final_step == SFT_STEPS and not result.interrupted
    record(arrays, "sft", result)
    record_params(arrays, "sft", result.params)
    # its parameters after step 2, to compare with the 2-process run's (stopped there)
    state, _ = restore_state(out / "single" / "sft" / "checkpoints", INTERRUPT_AT, config,
                             jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    record_params(arrays, "sft_step2", state["params"])
    del result, state

    started = time.time()
    config = make_config(out, "dpo")
    result = trainlib.train(config, "dpo", out / "single" / "dpo", stages.load_model(config), progress=False)
    report["timings"]["dpo"] = round(time.time() - started, 1)
    record(arrays, "dpo", result)
    record_params(arrays, "dpo", result.params)
    del result

    # Resume the 2-process SFT run (stopped after step 2) in this one process, for step 3.
    deadline = time.time() + float(os.environ.get("KWJAX_TEST_WAIT", "600"))
    while not (out / "multi_done").exists():
        if time.time() > deadline:
            raise SystemExit("the 2-process run did not finish")
        time.sleep(0.5)
    shutil.copytree(out / "multi" / "sft", out / "resumed" / "sft")
    started = time.time()
    config = make_config(out, "sft")
    result = trainlib.train(config, "sft", out / "resumed" / "sft", stages.load_model(config), progress=False,
                            resume=True)
    report["timings"]["resume"] = round(time.time() - started, 1)
    report["resumed"] = {"final_step": result.final_step, "steps": [h["step"] for h in result.metrics if "loss" in h]}
    record(arrays, "resumed", result)
    record_params(arrays, "resumed", result.params)

    np.savez(out / "single.npz", **arrays)
    (out / "single.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if MODE not in ("multi", "single") or len(sys.argv) != 3:
        raise SystemExit(__doc__)
    (run_multi if MODE == "multi" else run_single)(pathlib.Path(sys.argv[2]))
