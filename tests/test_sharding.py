"""Sharded training equals one-device training; the partition rules and mesh checks of kwjax.sharding.

The multi-device runs happen in subprocesses (tests/_multidevice_worker.py) because the 8 simulated CPU
devices (`--xla_force_host_platform_device_count=8`) must be requested before jax is imported, and this
process has already imported it with one device. Each mesh runs 2 SFT and 2 DPO steps (precomputed
reference, computed on that mesh) of the tiny model, then the losses, gradient norms, eval losses and
final parameters are compared with the 1-device run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import kwjax
from kwjax import sharding, train as trainlib
from kwjax.models.gemma3 import config as cfglib

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_multidevice_worker.py")
BASELINE = "1,1,1"
SHARDED = ["2,2,2", "8,1,1", "1,2,4"]  # (data, fsdp, tensor); 1,2,4: tensor=4 > the 2 KV heads

# Tolerances against the 1-device run (all float32). Sharding changes reduction orders (the batch sum
# is split over data×fsdp, the hidden and vocabulary contractions over fsdp/tensor), nothing else.
# Measured max |difference| (x86 CPU, jax 0.10.2), losses / grad norms / eval losses over both steps:
#   2,2,2: SFT loss 2.9e-6 (of 12.55), grad_norm 4.8e-7; DPO loss 6.0e-8, grad_norm 9.5e-7, eval 1.2e-7
#   8,1,1: SFT loss 9.5e-7, grad_norm 4.8e-7;             DPO loss 5.4e-7, grad_norm 3.8e-6, eval 0
#   1,2,4: SFT loss 2.9e-6, grad_norm 9.5e-7;             DPO loss 3.6e-7, grad_norm 9.5e-7, eval 1.2e-7
# i.e. all within rtol 1e-5, so metrics are held to atol = rtol = 1e-5 (the starting point, not loosened).
METRIC_TOL = dict(atol=1e-5, rtol=1e-5)
# Parameters after 2 Adam steps (lr 1e-3, so each element moves by at most ~1.5e-3): almost every element
# agrees to 1e-5, but Adam divides each gradient element by its own running RMS, so where the step-2
# gradient nearly cancels the step-1 momentum, float32 rounding differences in the gradient become
# differences of a sizeable fraction of lr in the update. Measured max |difference| (SFT / DPO):
#   2,2,2: 8.9e-6 / 8.7e-5 (embedding[22063, 44]);  8,1,1: 2.0e-5 / 3.7e-5;  1,2,4: 1.2e-5 / 1.7e-5
# and at most 2 elements of the 16.8M per run exceed atol = rtol = 1e-5. So: every element within
# atol 2e-4 (about 2x the worst measured, still only ~0.1 of one step's update), plus at most
# MAX_OUTLIERS elements outside 1e-5 -- a real sharding bug (a missing or doubled shard of a gradient)
# moves whole rows or blocks, thousands of elements. Gradient *scale* bugs, which Adam's normalisation
# hides from the parameters, show up in the losses of step 2 and the grad norms, held to 1e-5 above.
PARAM_TOL = dict(atol=2e-4, rtol=1e-5)
PARAM_STRICT_TOL = dict(atol=1e-5, rtol=1e-5)
MAX_OUTLIERS = 8


def _tag(mesh: str) -> str:
    return mesh.replace(",", "_")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, tuple[dict, dict]]]:
    """{mesh: (arrays, report)} from the worker: two processes side by side (the machine has 2 cores)."""
    out = tmp_path_factory.mktemp("multidevice")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    groups = [[BASELINE, "8,1,1"], ["2,2,2", "1,2,4"]]
    procs = []
    for i, group in enumerate(groups):
        log = (out / f"worker{i}.log").open("w")
        procs.append((group, log, subprocess.Popen([sys.executable, str(WORKER), str(out), *group], cwd=REPO,
                                                   env=env, stdout=log, stderr=subprocess.STDOUT)))
    failures = []
    for group, log, proc in procs:
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            text = Path(log.name).read_text(errors="replace")
            failures.append(f"worker {group} exited {rc}:\n{text[-4000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))
    results = {}
    for mesh in [BASELINE, *SHARDED]:
        with np.load(out / f"{_tag(mesh)}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        results[mesh] = (arrays, json.loads((out / f"{_tag(mesh)}.json").read_text()))
    yield results
    shutil.rmtree(out, ignore_errors=True)  # ~0.5 GB of parameters, otherwise kept to the session's end


def _split(arrays: dict, method: str) -> tuple[dict, dict]:
    metrics = {k: v for k, v in arrays.items() if k.startswith(f"{method}/") and "/params/" not in k}
    params = {k: v for k, v in arrays.items() if k.startswith(f"{method}/params/")}
    return metrics, params


# ---- sharded == one device ---------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", SHARDED)
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_sharded_run_matches_one_device(runs, mesh, method):
    base_metrics, base_params = _split(runs[BASELINE][0], method)
    metrics, params = _split(runs[mesh][0], method)
    assert sorted(metrics) == [f"{method}/eval_loss", f"{method}/grad_norm", f"{method}/loss"]
    assert metrics[f"{method}/loss"].shape == (2,)
    assert np.isfinite(metrics[f"{method}/loss"]).all()
    # the run learned something, so agreement is not agreement of two frozen models
    assert base_metrics[f"{method}/loss"][1] < base_metrics[f"{method}/loss"][0]
    chex.assert_trees_all_close(metrics, base_metrics, **METRIC_TOL)

    assert sorted(params) == sorted(base_params) and len(params) == 1 + 1 + 3 * 13
    chex.assert_trees_all_close(params, base_params, **PARAM_TOL)
    outliers = {k: int((~np.isclose(params[k], base_params[k], **PARAM_STRICT_TOL)).sum()) for k in params}
    outliers = {k: n for k, n in outliers.items() if n}
    assert sum(outliers.values()) <= MAX_OUTLIERS, outliers


def test_all_runs_start_from_the_same_weights(runs):
    fingerprints = {(m, method): r[f"{method}_init_fingerprint"] for m, (_, r) in runs.items()
                    for method in ("sft", "dpo")}
    assert len(set(fingerprints.values())) == 1, fingerprints


def test_each_dpo_run_computed_its_own_reference(runs):
    # own $KWJAX_CACHE per run, so the sharded runs' reference log-probs came from their own mesh:
    # one cache file for the train split and one for the eval split
    assert {m: r["dpo_reference_cache_files"] for m, (_, r) in runs.items()} == {m: 2 for m in runs}


# ---- the parameters really are sharded as the rules say ------------------------------------------------


def test_parameters_are_sharded_on_the_8_device_meshes(runs):
    # the worker itself checked every final parameter of every run (mesh shape, device count, spec
    # equivalent to the rule's, shard shape) and would have exited non-zero; here the headline cases.
    for mesh in SHARDED:
        report = runs[mesh][1]
        assert report["n_devices"] == 8
        for method in ("sft", "dpo"):
            specs = report[f"{method}_shardings"]
            assert len(specs) == 41
            assert all(s["devices"] == 8 for s in specs.values()), mesh
    s = runs["2,2,2"][1]["sft_shardings"]
    assert s["embedding"]["spec"] == ["tensor", "fsdp"]
    assert s["embedding"]["shard_shape"] == [262144 // 2, 64 // 2]
    assert s["layer_0/attn/k"]["spec"] == ["fsdp", "tensor"] and s["layer_0/attn/k"]["shard_shape"] == [32, 1, 16]
    assert s["layer_2/attn/o"]["spec"] == ["tensor", None, "fsdp"] and s["layer_2/attn/o"]["shard_shape"] == [2, 16, 32]
    assert s["layer_1/mlp/down"]["shard_shape"] == [64, 32]
    assert s["final_norm/scale"]["spec"] == [] and s["final_norm/scale"]["shard_shape"] == [64]

    s = runs["1,2,4"][1]["dpo_shardings"]
    assert s["embedding"]["shard_shape"] == [262144 // 4, 64 // 2]
    assert s["layer_0/attn/q"]["shard_shape"] == [32, 1, 16]  # 4 query heads over tensor=4
    assert s["layer_0/attn/k"]["spec"] == ["fsdp"]  # 2 KV heads do not split over tensor=4: dropped
    assert s["layer_0/attn/k"]["shard_shape"] == [32, 2, 16]
    assert s["layer_0/mlp/gate"]["shard_shape"] == [32, 128 // 4]

    # 8,1,1 is pure data parallelism: every parameter whole on every device
    s = runs["8,1,1"][1]["sft_shardings"]
    assert all(v["shard_shape"] == v["shape"] for v in s.values())


# ---- mesh and batch errors ------------------------------------------------------------------------------


def test_train_refuses_a_batch_that_does_not_divide_over_the_mesh(runs):
    assert runs[BASELINE][1]["batch_errors"] == []  # one device: nothing to refuse
    expected = {"2,2,2": ["batch_size 6 ", "data×fsdp = 4 devices × grad_accum 1",
                          "batch_size 4 ", "data×fsdp = 4 devices × grad_accum 2"],
                "8,1,1": ["batch_size 12 ", "data×fsdp = 8 devices × grad_accum 1",
                          "batch_size 8 ", "data×fsdp = 8 devices × grad_accum 2"],
                "1,2,4": ["batch_size 3 ", "data×fsdp = 2 devices × grad_accum 1",
                          "batch_size 2 ", "data×fsdp = 2 devices × grad_accum 2"]}
    for mesh, parts in expected.items():
        errors = runs[mesh][1]["batch_errors"]
        assert len(errors) == 2, errors
        for err, (size, detail) in zip(errors, [parts[:2], parts[2:]]):
            assert "does not divide over the mesh" in err and size in err and detail in err, err


def test_make_mesh_on_8_devices(runs):
    checks = runs["2,2,2"][1]["make_mesh"]
    assert checks["-1,2,2"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert checks["-1,1,8"] == {"data": 1, "fsdp": 1, "tensor": 8}
    assert checks["2,2,1"] == "MeshError: mesh data=2 × fsdp=2 × tensor=1 = 4 but there are 8 devices"
    assert checks["4,2,2"] == "MeshError: mesh data=4 × fsdp=2 × tensor=2 = 16 but there are 8 devices"
    assert checks["-1,3,1"] == "MeshError: 8 devices do not divide into fsdp=3 × tensor=1"
    assert checks["-1,1,16"] == "MeshError: 8 devices do not divide into fsdp=1 × tensor=16"
    for sizes in ("0,1,1", "2,0,4", "-2,1,1"):
        assert checks[sizes].startswith("MeshError: mesh sizes must be positive"), checks[sizes]


def test_make_mesh_errors_in_process():
    one = jax.devices()[:1]
    mesh = sharding.make_mesh(devices=one)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1} and mesh.axis_names == sharding.AXES
    with pytest.raises(sharding.MeshError, match=r"mesh data=2 × fsdp=1 × tensor=1 = 2 but there are 1 devices"):
        sharding.make_mesh(2, 1, 1, devices=one)
    with pytest.raises(sharding.MeshError, match=r"1 devices do not divide into fsdp=2 × tensor=1"):
        sharding.make_mesh(-1, 2, 1, devices=one)
    with pytest.raises(sharding.MeshError, match="must be positive"):
        sharding.make_mesh(1, 1, 0, devices=one)
    assert issubclass(sharding.MeshError, ValueError)


def test_train_raises_mesh_error_for_a_mesh_that_does_not_fit(tmp_path):
    """Fails at once (MeshError, a ValueError the CLI reports), before data or the model are read."""
    import runpy

    c = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 1
    with pytest.raises(sharding.MeshError, match="but there are 1 devices"):
        trainlib.train(c, "sft", tmp_path, None, progress=False, devices=jax.devices()[:1])


# ---- partition rules ----------------------------------------------------------------------------------------


def _mesh(data=1, fsdp=1, tensor=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


def _norm(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("path, shape, mesh, expected", [
    ("embedding", (262144, 64), (2, 2, 2), ("tensor", "fsdp")),
    ("layer_0/attn/q", (64, 4, 16), (2, 2, 2), ("fsdp", "tensor", None)),
    ("layer_0/attn/k", (64, 2, 16), (2, 2, 2), ("fsdp", "tensor", None)),
    ("layer_0/attn/v", (64, 1, 16), (1, 2, 2), ("fsdp", None, None)),  # one KV head: not split over tensor=2
    ("layer_3/attn/k", (64, 2, 16), (1, 2, 4), ("fsdp", None, None)),  # 2 KV heads over tensor=4: dropped
    ("layer_0/attn/o", (4, 16, 64), (2, 2, 2), ("tensor", None, "fsdp")),
    ("layer_0/mlp/gate", (64, 128), (1, 3, 2), (None, "tensor")),  # 64 does not divide by fsdp=3: dropped
    ("layer_0/mlp/up", (64, 96), (1, 2, 64), ("fsdp", None)),  # 96 does not divide by tensor=64
    ("layer_0/mlp/down", (128, 64), (2, 2, 2), ("tensor", "fsdp")),
    ("embedding", (262145, 64), (1, 1, 2), (None, "fsdp")),  # odd vocabulary: only the hidden split
    # norms, including those under attn/ that must not match the q/k rules, stay replicated
    ("layer_0/attn/query_norm/scale", (16,), (2, 2, 2), (None,)),
    ("layer_0/attn/key_norm/scale", (16,), (2, 2, 2), (None,)),
    ("layer_0/pre_ffw_norm/scale", (64,), (2, 2, 2), (None,)),
    ("final_norm/scale", (64,), (2, 2, 2), (None,)),
])
def test_param_spec_rules(path, shape, mesh, expected):
    assert _norm(sharding.param_spec(path, shape, _mesh(*mesh)), len(shape)) == expected


def test_every_matrix_of_the_model_has_a_rule():
    """No parameter silently falls through to the replicated catch-all (e.g. after a rename)."""
    config = cfglib.tiny(vocab_size=512, num_layers=3)
    shapes = jax.eval_shape(lambda: kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(0)))
    mesh = _mesh(1, 2, 2)
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    assert len(leaves) == 1 + 1 + 3 * 13
    for keys, x in leaves:
        path = sharding.param_path(keys)
        spec = _norm(sharding.param_spec(path, x.shape, mesh), x.ndim)
        if x.ndim >= 2:
            assert "fsdp" in spec and "tensor" in spec, (path, x.shape, spec)
        else:
            assert path.endswith("/scale") and spec == (None,), (path, spec)
    # the shardings a real Mesh gets for them are the same specs
    real = sharding.make_mesh(devices=jax.devices()[:1])
    for (keys, x), s in zip(leaves, jax.tree.leaves(sharding.param_shardings(shapes, real))):
        assert s.mesh is real and tuple(s.spec) == tuple(sharding.param_spec(sharding.param_path(keys), x.shape, real))


def test_batch_sharding_and_divisor():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    assert sharding.replicated(mesh).spec == P()
    assert sharding.batch_divisor(mesh) == 1
    assert sharding.batch_divisor(_mesh(2, 4, 1)) == 8 and sharding.batch_divisor(_mesh(1, 2, 4)) == 2
