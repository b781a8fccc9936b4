"""Multi-process training (JAX's multi-controller runtime) equals one-process training.

Two JAX processes on this machine, 2 CPU devices each, joined through a coordinator on 127.0.0.1 with
gloo collectives (what `jax.distributed.initialize` does on a Cloud TPU slice, where each host is one
process), run SFT and DPO on 4-device meshes; one process with 4 CPU devices runs the same meshes. Same
mesh shapes, so the same partitioning: only the process boundary (the batch assembled from
process-local rows, cross-process collectives, the reference pass gathered to every process, Orbax
writing from both processes) differs. See tests/_multiprocess_worker.py for what each run does.

The rest of the file tests the pieces in this process: the distributed settings, the process-local
batch assembly, mixed precision (compute_dtype), and the CLI flag.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwjax
from kwjax import batching, distributed, feed, objectives, sharding, stages
from kwjax.models.gemma3 import config as cfglib
from kwjax import step as steplib
from kwjax.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT = 600  # seconds for the whole group of workers; a hang fails the test instead of blocking CI

# Tolerances of the 2-process run against the 1-process run (float32, same mesh shapes: the only numeric
# difference is how the cross-process collectives (gloo) reduce). Measured in two runs (x86 CPU, jax 0.10.2):
#   SFT, mesh (1,2,2): losses, grad norms, eval loss and all 16.9M parameters after 2 steps bitwise equal.
#   DPO, mesh (2,2,1) (the gradient all-reduce over `data` crosses processes): one run bitwise equal metrics
#   and parameters within 3e-10; the other step 1 equal, step 2 loss 6.0e-8 apart (of 0.677), grad_norm
#   1.9e-6 (of 4.48), eval loss 2.4e-7 (of 0.666), parameters within 4e-8 except 1 element at 1.6e-5:
#   embedding[22063, 44], where Adam's per-element normalisation amplifies float noise (the same element
#   as in tests/test_sharding.py).
#   Resuming the 2-process checkpoint in 1 process: step 3 and the final parameters bitwise equal.
# So metrics are held to 1e-6, parameters to the policy of test_sharding: every element within atol 2e-4,
# at most MAX_OUTLIERS outside 1e-6 (a missing or doubled shard would move thousands).
METRIC_TOL = dict(atol=1e-6, rtol=1e-6)
PARAM_TOL = dict(atol=2e-4, rtol=1e-6)
PARAM_STRICT_TOL = dict(atol=1e-6, rtol=1e-6)
MAX_OUTLIERS = 8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(root: Path) -> None:
    """The first 16 training and 8 validation rows of the shipped set, as SFT and DPO files."""
    from kwjax import data as datalib

    root.mkdir(parents=True, exist_ok=True)
    train = datalib.load_examples(split="train")[:16]
    evals = datalib.load_examples(split="validation")[:8]
    for kind, view in (("sft", datalib.sft_view), ("dpo", datalib.dpo_view)):
        for name, rows in (("train", train), ("eval", evals)):
            (root / f"{kind}_{name}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in view(rows)), encoding="utf-8")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("KWJAX_")}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the 2-process run and the 1-process run side by side; returns what they wrote."""
    out = tmp_path_factory.mktemp("multiprocess")
    _write_data(out / "data")
    port = _free_port()
    started = time.time()
    procs = []
    for name, extra in [("multi0", dict(KWJAX_COORDINATOR=f"127.0.0.1:{port}", KWJAX_NUM_PROCESSES="2",
                                         KWJAX_PROCESS_ID="0")),
                        ("multi1", dict(KWJAX_COORDINATOR=f"127.0.0.1:{port}", KWJAX_NUM_PROCESSES="2",
                                         KWJAX_PROCESS_ID="1")),
                        ("single", dict(KWJAX_TEST_WAIT=str(TIMEOUT)))]:
        log = (out / f"{name}.log").open("w")
        mode = "single" if name == "single" else "multi"
        # one compilation cache for the three: the programs they share (weights init, the 1-process run's
        # SFT step again when it resumes) compile once
        extra["JAX_COMPILATION_CACHE_DIR"] = str(out / "jax_cache")
        procs.append((name, log, subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], cwd=REPO,
                                                  env=_env(**extra), stdout=log, stderr=subprocess.STDOUT)))
    failures = []
    while True:  # until all are done, one fails (the others would wait for it forever) or time runs out
        codes = {name: proc.poll() for name, _, proc in procs}
        failures = [(name, rc) for name, rc in codes.items() if rc not in (None, 0)]
        if time.time() > started + TIMEOUT:
            failures += [(name, f"timeout after {TIMEOUT} s") for name, rc in codes.items() if rc is None]
        if failures or all(rc == 0 for rc in codes.values()):
            break
        time.sleep(0.5)
    for _, log, proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    if failures:
        text = "\n\n".join(f"{name} exited {rc}:\n" + (out / f"{name}.log").read_text(errors="replace")[-3000:]
                           for name, rc in failures)
        pytest.fail(text)
    with np.load(out / "multi.npz") as z:
        multi = {k: z[k] for k in z.files}
    with np.load(out / "single.npz") as z:
        single = {k: z[k] for k in z.files}
    reports = [json.loads((out / f"multi_{i}.json").read_text()) for i in range(2)]
    yield {"out": out, "multi": multi, "single": single, "reports": reports,
           "single_report": json.loads((out / "single.json").read_text()), "seconds": time.time() - started}
    # The runs' checkpoints and compilation cache take ~1.7 GB; pytest would keep them to the session's end.
    shutil.rmtree(out, ignore_errors=True)


def _metrics_jsonl(path: Path) -> dict:
    """{loss, grad_norm, eval_loss: per-step arrays} from a run's metrics.jsonl (JSON floats: exact)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {name: np.array([r[name] for r in rows if name in r], np.float64)
            for name in ("loss", "grad_norm", "eval_loss")}


def _multi_metrics(runs, method: str) -> dict:
    if method == "sft":
        return {n: runs["multi"][f"sft/{n}"] for n in ("loss", "grad_norm", "eval_loss")}
    return _metrics_jsonl(runs["out"] / "multi" / "dpo" / "metrics.jsonl")


def _exported_params(directory: Path, **kw) -> dict:
    model = kwjax.load(directory, dtype="float32", **kw)
    return {sharding.param_path(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(model.params)}


def _multi_params(runs, method: str) -> dict:
    if method == "sft":
        return _params(runs["multi"], "sft")
    return _exported_params(runs["out"] / "multi" / "dpo" / "model")


def _params(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix) + len("/params/"):]: v for k, v in arrays.items() if k.startswith(f"{prefix}/params/")}


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


# ---- 2 processes == 1 process -------------------------------------------------------------------------------


def test_two_processes_of_two_devices_each(runs):
    for pid, r in enumerate(runs["reports"]):
        assert (r["process"], r["process_count"], r["local_devices"], r["devices"]) == (pid, 2, 2, 4)
    assert runs["single_report"]["devices"] == 4


def test_each_process_feeds_only_the_rows_its_devices_hold(runs):
    p0, p1 = (r["rows"] for r in runs["reports"])
    # SFT mesh (1, 2, 2): rows split over fsdp (one process each), repeated over tensor within a process
    assert p0["sft"] == [0, 1, 2, 3] and p1["sft"] == [4, 5, 6, 7]
    # DPO mesh (2, 2, 1), 16 stacked rows: process 0 holds all 8 chosen rows, process 1 the rejected ones
    assert p0["dpo"] == list(range(8)) and p1["dpo"] == list(range(8, 16))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_losses_equal_the_one_process_run(runs, method):
    multi, single = _multi_metrics(runs, method), runs["single"]
    steps = 2  # the 2-process SFT run stopped after step 2
    for name in ("loss", "grad_norm", "eval_loss"):
        m, s = multi[name], single[f"{method}/{name}"]
        assert len(m) == (steps if name != "eval_loss" else 1), (name, m)
        np.testing.assert_allclose(m, s[:len(m)], **METRIC_TOL, err_msg=f"{method} {name}")
    assert np.isfinite(multi["loss"]).all()
    assert single[f"{method}/loss"][1] < single[f"{method}/loss"][0]  # it learns: not two frozen models agreeing
    if method == "dpo":
        assert abs(multi["loss"][0] - np.log(2)) < 1e-6  # step 1: policy = reference, on 2 processes too


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_parameters_equal_the_one_process_run(runs, method):
    multi = _multi_params(runs, method)  # DPO: the model process 0 exported
    single = _params(runs["single"], "sft_step2" if method == "sft" else "dpo")  # both after step 2
    assert sorted(multi) == sorted(single) and len(multi) == 1 + 1 + 3 * 13
    chex.assert_trees_all_close(multi, single, **PARAM_TOL)
    outliers = {k: int((~np.isclose(multi[k], single[k], **PARAM_STRICT_TOL)).sum()) for k in multi}
    outliers = {k: n for k, n in outliers.items() if n}
    assert sum(outliers.values()) <= MAX_OUTLIERS, outliers


def test_a_signal_on_one_process_stops_both_at_the_same_step(runs):
    for r in runs["reports"]:  # interrupt_at=2 was given to process 1 only
        assert r["sft"] == {"final_step": 2, "interrupted": True}, r["sft"]
        assert r["dpo"] == {"final_step": 2, "interrupted": False}
    assert Checkpointer(runs["out"] / "multi" / "sft" / "checkpoints").latest_step() == 2


def _restore_state(directory: Path, step: int, config):
    """A train-state checkpoint restored the way train() restores, here onto this process's one device."""
    from kwjax import optimizer

    params = jax.eval_shape(lambda: stages.load_model(config).params)
    tx, _ = optimizer.make(config.optimizer, 1e-3, 10, params)
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(directory)
    try:
        return ckpt.restore(step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes))
    finally:
        ckpt.close()


def test_checkpoint_written_by_two_processes_restores_in_one(runs):
    """Restored here, in one process with one device: exactly the parameters the 2 processes held."""
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    state, meta = _restore_state(runs["out"] / "multi" / "sft" / "checkpoints", 2, config)
    assert int(state["step"]) == 2 and meta["method"] == "sft" and meta["step"] == 2
    assert jax.tree.leaves(state["opt_state"])  # the Adam moments came back too
    got = {sharding.param_path(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state["params"])}
    want = _params(runs["multi"], "sft")
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_one_process_resumes_the_two_process_run_exactly(runs):
    """The 1-process worker continued the 2-process SFT checkpoint (step 2) for step 3."""
    single = runs["single"]
    assert runs["single_report"]["resumed"] == {"final_step": 3, "steps": [3]}
    # measured: step 3's loss, grad norm and the final parameters bitwise equal to the uninterrupted run's
    np.testing.assert_allclose(single["resumed/loss"], single["sft/loss"][2:], **METRIC_TOL)
    np.testing.assert_allclose(single["resumed/grad_norm"], single["sft/grad_norm"][2:], **METRIC_TOL)
    chex.assert_trees_all_close(_params(single, "resumed"), _params(single, "sft"), **PARAM_STRICT_TOL)


# ---- process 0 reports, the others stay quiet ------------------------------------------------------------------


def test_only_process_0_writes_metrics_reports_and_exports(runs):
    out = runs["out"] / "multi"
    for method, rows in (("sft", 3), ("dpo", 3)):  # 2 steps + 1 evaluation, each written once
        lines = (out / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == rows, lines
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 2]
        assert (out / method / "data_report.json").is_file()
        assert len(list((out / method / "tensorboard").iterdir())) == 1  # one writer's event file
    assert (out / "dpo" / "config.json").is_file()
    # the final model, written by process 0 from the gathered parameters, as a kwjax and a Hugging Face
    # directory that hold the same tensors (and equal the 1-process run's: test_parameters_equal...)
    native, hf = _exported_params(out / "dpo" / "model"), _exported_params(out / "dpo" / "hf")
    assert sorted(native) == sorted(hf) and len(native) == 1 + 1 + 3 * 13
    for k in native:
        np.testing.assert_array_equal(hf[k], native[k], err_msg=k)


def test_reference_cache_is_process_0s_and_the_others_follow_it(runs):
    r0, r1 = runs["reports"]
    assert len(r0["cache_files"]) == 2 and r1["cache_files"] == []  # train and eval splits, process 0's disk
    # second reference pass: process 0 hit its cache, process 1 (empty cache) took its values: no forward pass
    assert r0["reference_again_traced"] == 0 and r1["reference_again_traced"] == 0
    cached = np.load(next((runs["out"] / "cache0").rglob(r0["cache_files"][0])))
    again = runs["multi"]["reference_again"]
    assert again.shape == (16, 2) and again.dtype == np.float64
    if not np.array_equal(again, cached):  # the train split's file may sort second
        cached = np.load(next((runs["out"] / "cache0").rglob(r0["cache_files"][1])))
    np.testing.assert_array_equal(again, cached)


# ---- errors every process raises alike -----------------------------------------------------------------------------


def test_batch_that_does_not_split_over_processes_is_refused_on_every_process(runs):
    for r in runs["reports"]:
        e = r["batch_error"]
        assert "batch_size 6 does not divide over the mesh" in e and "2 processes × 2 local devices" in e, e
        assert "multiple of 4" in e, e


def test_unshared_checkpoint_directory_and_differing_inputs_are_refused(runs):
    for r in runs["reports"]:
        assert "is not shared by all processes (processes [1]" in r["shared_error"], r["shared_error"]
        assert "gs://" in r["shared_error"]
        assert "the test values differ between processes (value: processes [1]" in r["equal_error"], r["equal_error"]


# ---- in this process ------------------------------------------------------------------------------------------------


def test_initialize_settings_from_the_environment(monkeypatch):
    for k in ("KWJAX_COORDINATOR", "KWJAX_NUM_PROCESSES", "KWJAX_PROCESS_ID", "KWJAX_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert distributed._explicit_settings() is None
    assert distributed.initialize(False) is False
    assert distributed.initialize() is False  # nothing set: one process
    monkeypatch.setenv("KWJAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match=r"\$KWJAX_NUM_PROCESSES, \$KWJAX_PROCESS_ID not set"):
        distributed._explicit_settings()
    monkeypatch.setenv("KWJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("KWJAX_PROCESS_ID", "2")
    with pytest.raises(distributed.DistributedError, match=r"PROCESS_ID=2 must lie in \[0, \$KWJAX_NUM_PROCESSES=2\)"):
        distributed._explicit_settings()
    monkeypatch.setenv("KWJAX_PROCESS_ID", "one")
    with pytest.raises(distributed.DistributedError, match="must be integers"):
        distributed._explicit_settings()
    monkeypatch.setenv("KWJAX_PROCESS_ID", "1")
    assert distributed._explicit_settings() == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                                "process_id": 1}
    monkeypatch.setenv("KWJAX_COORDINATOR", "127.0.0.1")
    with pytest.raises(distributed.DistributedError, match="expected host:port"):
        distributed._explicit_settings()
    for k in ("KWJAX_COORDINATOR", "KWJAX_NUM_PROCESSES", "KWJAX_PROCESS_ID"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("KWJAX_DISTRIBUTED", "maybe")
    with pytest.raises(distributed.DistributedError, match="KWJAX_DISTRIBUTED='maybe'"):
        distributed.initialize()


def test_one_process_helpers_are_the_plain_operations():
    assert distributed.is_main() and not distributed.is_multiprocess()
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    np.testing.assert_array_equal(distributed.process_rows(mesh, 6), np.arange(6))
    assert distributed.any_process(True) and not distributed.any_process(False)
    np.testing.assert_array_equal(distributed.gather_values(np.int32(3)), [3])
    tree = {"a": jnp.arange(3.0), "b": np.ones(2, np.float64)}
    chex.assert_trees_all_equal(distributed.to_host(tree), {"a": np.arange(3.0, dtype=np.float32), "b": np.ones(2)})
    assert distributed.broadcast(tree)["b"].dtype == np.float64
    distributed.all_equal({"x": distributed.digest("anything")}, "values")  # one process: nothing to compare
    digests = distributed.params_digests({"w": jnp.ones((2, 3), jnp.bfloat16), "b": np.zeros(3, np.float32)})
    assert sorted(digests) == ["['b']", "['w']"] and all(d.dtype == np.int32 and d.shape == (2,) for d in digests.values())
    assert digests["['w']"][1] == 6
    distributed.check_shared_dir("/nonexistent/anywhere", "a directory")


def test_64_bit_values_that_would_lose_precision_are_refused():
    assert distributed._transportable(np.array([0.5, -3.25])).dtype == np.float32
    with pytest.raises(distributed.DistributedError, match="without losing precision"):
        distributed._transportable(np.array([0.1]))
    with pytest.raises(distributed.DistributedError, match="without losing precision"):
        distributed._transportable(np.array([2**40]))


def _tiny_data(kind: str, n: int) -> feed.Data:
    rng = np.random.default_rng(0)

    def seq():
        return batching.Sequence_(tuple(int(x) for x in rng.integers(3, 90, rng.integers(2, 9))),
                                  tuple(int(x) for x in rng.integers(3, 90, rng.integers(1, 7))))

    items = [seq() for _ in range(n)] if kind == "sft" else [(seq(), seq()) for _ in range(n)]
    return feed.Data(items, [str(i) for i in range(n)], batching.Report(rows=n), kind)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_global_batch_is_the_collated_batch(kind):
    """One process: the batch assembled from process-local rows is exactly the whole collated batch."""
    cfg = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    cfg.batch_size, cfg.data.length_bucket = 4, 4
    data = _tiny_data(kind, 7)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    ref = np.random.default_rng(1).normal(size=(7, 2))
    for idx in ([0, 3, 5, 6], [2, 4]):  # a full and a partial (padded) batch
        got = feed.global_batch(data, idx, cfg, mesh, ref if kind == "dpo" else None)
        want = data.collate(idx, 4, 4)
        if kind == "dpo":
            want["ref_logps_B"] = np.zeros(8, np.float32)
            want["ref_logps_B"][:len(idx)] = ref[idx, 0]
            want["ref_logps_B"][4:4 + len(idx)] = ref[idx, 1]
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    # and a subset of the rows, collated with the batch's padded lengths, is that subset of the batch
    rows = data.rows([0, 3, 5], 4)
    lengths = batching.padded_lengths(rows, 4)
    whole = batching.collate_rows(rows, *lengths)
    sub = [1, 3] if kind == "sft" else [1, 3, 5, 7]  # a real and a padding row; DPO: also rejected rows
    part = batching.collate_rows([rows[i] for i in sub], *lengths)
    for k in whole:
        np.testing.assert_array_equal(part[k], whole[k][sub], err_msg=k)


def test_bfloat16_compute_with_float32_weights():
    """compute_dtype: the forward and backward run in bfloat16, gradients reach the float32 parameters."""
    mcfg = cfglib.tiny(vocab_size=512, num_layers=2)
    params = kwjax.models.gemma3.model.init_params(mcfg, jax.random.PRNGKey(0))
    module = kwjax.models.gemma3.model.Gemma3(mcfg, param_dtype=jnp.float32)
    cfg = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    rng = np.random.default_rng(0)
    seqs = [batching.Sequence_(tuple(rng.integers(3, 500, 10).tolist()), tuple(rng.integers(3, 500, 6).tolist()))
            for _ in range(4)]
    batch = {k: jnp.asarray(v) for k, v in batching.collate(seqs, 8).items()}
    totals = objectives.totals(objectives.get("sft", cfg), batch)

    def run(compute):
        cfg.compute_dtype = compute
        loss_fn = steplib.make_loss_fn(module, "sft", cfg)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None, totals)
        jaxpr = str(jax.make_jaxpr(lambda p: loss_fn(p, batch, None, totals)[0])(params))
        return float(loss), grads, jaxpr

    loss32, grads32, jaxpr32 = run("")
    loss16, grads16, jaxpr16 = run("bfloat16")
    assert "bf16" not in jaxpr32 and "dot_general" in jaxpr16 and "bf16" in jaxpr16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert abs(loss16 - loss32) < 0.02 * abs(loss32), (loss16, loss32)
    cos = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32))) /
                (jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(grads16))) *
                 jnp.sqrt(sum(jnp.vdot(b, b) for b in jax.tree.leaves(grads32)))))
    assert cos > 0.99, cos
    assert steplib.compute_dtype(cfg, jnp.bfloat16) is None  # bfloat16 weights: already the compute dtype
    cfg.compute_dtype = "float16x"
    with pytest.raises(ValueError, match="unknown dtype 'float16x'"):
        steplib.compute_dtype(cfg, jnp.float32)


@pytest.mark.parametrize("name", ["tpu_v5e8", "tpu_v4_8", "tpu_multihost"])
def test_tpu_configs(name):
    c = runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()
    assert c.dtype == "float32" and c.compute_dtype == "bfloat16" and c.model.endswith("gemma-3-1b-it")
    devices = {"tpu_v5e8": [8], "tpu_v4_8": [4], "tpu_multihost": [32, 16]}[name]  # v5litepod-32, v4-32
    for n in devices:
        data = c.mesh.data if c.mesh.data != -1 else n // (c.mesh.fsdp * c.mesh.tensor)
        assert data * c.mesh.fsdp * c.mesh.tensor == n
        assert c.batch_size % (data * c.mesh.fsdp * c.grad_accum) == 0


def test_cli_reports_incomplete_distributed_settings(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--method=sft", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=_env(KWJAX_COORDINATOR="127.0.0.1:1"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: $KWJAX_NUM_PROCESSES, $KWJAX_PROCESS_ID not set" in r.stderr and "Traceback" not in r.stderr
