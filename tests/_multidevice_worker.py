"""Helper for tests/test_sharding.py: 2 SFT and 2 DPO steps of the tiny model on a simulated CPU mesh.

    python tests/_multidevice_worker.py OUT_DIR MESH [MESH ...]      (MESH: "data,fsdp,tensor")

Runs in its own process because the 8 simulated host devices must be requested before jax is imported.
"1,1,1" means one device (`devices=jax.devices()[:1]`), any other mesh all 8. For every mesh it writes
OUT_DIR/<d>_<f>_<t>.npz: per-step train metrics, the eval metrics, and the final params of each method
("sft/loss", "sft/grad_norm", "sft/eval_loss", "sft/params/<path>", same under "dpo/"), plus a JSON
report <d>_<f>_<t>.json: the shardings the final params came back with (checked here against the
partition rules; a mismatch makes the worker exit non-zero), the fingerprint of the starting weights,
and the messages of the batch-over-mesh errors `train` must raise on that mesh, and (8-device meshes)
what `make_mesh` does with sizes that do and do not fit 8 devices.

The data are the first 16 training and 8 validation rows of the shipped set, written as SFT/DPO files:
two steps of batch 8 are then exactly one epoch (so the end-of-epoch evaluation runs too), and DPO's
precomputed reference needs 3 forward batches instead of 23. Sequences are cut to data.max_length=48
(responses truncated, length_bucket 16): the 262k-token vocabulary projection dominates the CPU time,
and with these settings every run compiles one train-step shape. Each run gets its own workdir and its own reference cache ($KWJAX_CACHE), so
every mesh computes its own reference log-probs on its own mesh.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import pathlib  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from kwjax import data as datalib, reference as reflib, sharding, stages, train as trainlib  # noqa: E402

N_TRAIN, N_EVAL = 16, 8
MAX_LENGTH = 48


def write_data(root: pathlib.Path) -> dict[str, tuple[str, str]]:
    """{kind: (train file, eval file)} holding the first rows of the shipped splits."""
    train = datalib.load_examples(split="train")[:N_TRAIN]
    evals = datalib.load_examples(split="validation")[:N_EVAL]
    files = {}
    for kind, view in (("sft", datalib.sft_view), ("dpo", datalib.dpo_view)):
        paths = []
        for name, rows in (("train", train), ("eval", evals)):
            p = root / f"{kind}_{name}.jsonl"
            p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in view(rows)), encoding="utf-8")
            paths.append(str(p))
        files[kind] = tuple(paths)
    return files


def make_config(mesh: tuple[int, int, int], files, kind: str):
    c = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    c.max_steps = 2
    c.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.export_hf = False
    c.checkpoint_every = 100
    c.data.train_file, c.data.eval_file = files[kind]
    c.data.max_length, c.data.length_bucket = MAX_LENGTH, 16  # responses truncated (see the module doc)
    return c


def check_shardings(params, mesh_shape, n_devices: int) -> dict:
    """Each final param's spec, compared with the rules; returns {path: {...}} and raises on a mismatch."""
    report = {}
    for keys, x in jax.tree_util.tree_leaves_with_path(params):
        path = sharding.param_path(keys)
        s = x.sharding
        mesh = s.mesh
        got_shape = tuple(mesh.shape[a] for a in sharding.AXES)
        want = sharding.param_spec(path, x.shape, mesh)
        shard_shape = tuple(x.addressable_shards[0].data.shape)
        report[path] = {"spec": [list(a) if isinstance(a, tuple) else a for a in s.spec],
                        "devices": len(s.device_set), "shape": list(x.shape), "shard_shape": list(shard_shape)}
        problems = []
        if got_shape != tuple(mesh_shape):
            problems.append(f"mesh {got_shape} != {mesh_shape}")
        if len(s.device_set) != n_devices:
            problems.append(f"{len(s.device_set)} devices, expected {n_devices}")
        # Equivalence, not spec equality: on a mesh whose axes are 1 (the 1-device run, the fsdp and tensor
        # axes of 8,1,1) jit may return any equivalent spec (e.g. P() for P('fsdp', 'tensor', None)).
        if not s.is_equivalent_to(NamedSharding(mesh, want), x.ndim):
            problems.append(f"spec {s.spec} is not equivalent to the rule's {want}")
        expected_shard = tuple(d // (mesh.shape[a] if a else 1) for d, a in
                               zip(x.shape, tuple(want) + (None,) * (x.ndim - len(want))))
        if shard_shape != expected_shard:
            problems.append(f"shard shape {shard_shape} != {expected_shard}")
        if problems:
            raise AssertionError(f"{path}: " + "; ".join(problems))
    return report


def batch_errors(mesh, files) -> list[str]:
    """`train` on this mesh with batches that do not split over data×fsdp (× grad_accum) must refuse."""
    divisor = mesh[0] * mesh[1]
    if divisor == 1:
        return []
    cases = [dict(batch_size=divisor + divisor // 2, grad_accum=1),  # 12 on 8 devices, 6 on 2×2
             dict(batch_size=divisor, grad_accum=2)]  # grad_accum multiplies the divisor
    out = []
    for case in cases:
        c = make_config(mesh, files, "sft")
        c.batch_size, c.grad_accum = case["batch_size"], case["grad_accum"]
        try:
            with tempfile.TemporaryDirectory() as wd:
                trainlib.train(c, "sft", wd, None, progress=False)
        except trainlib.TrainingError as e:
            out.append(str(e))
        else:
            raise AssertionError(f"train accepted batch_size={case} on mesh {mesh}")
    return out


def mesh_checks() -> dict:
    """make_mesh on the 8 devices: data=-1 takes the rest; sizes that do not fit raise MeshError."""
    out = {"-1,2,2": dict(sharding.make_mesh(-1, 2, 2).shape), "-1,1,8": dict(sharding.make_mesh(-1, 1, 8).shape)}
    for sizes in ((2, 2, 1), (4, 2, 2), (-1, 3, 1), (-1, 1, 16), (0, 1, 1), (2, 0, 4), (-2, 1, 1)):
        try:
            sharding.make_mesh(*sizes)
        except sharding.MeshError as e:
            out[",".join(map(str, sizes))] = "MeshError: " + str(e)
        else:
            out[",".join(map(str, sizes))] = "no error"
    return out


def run_mesh(mesh: tuple[int, int, int], files, out_dir: pathlib.Path) -> None:
    devices = jax.devices()[:1] if mesh == (1, 1, 1) else jax.devices()
    tag = "_".join(map(str, mesh))
    arrays, report = {}, {"mesh": list(mesh), "n_devices": len(devices), "timings": {}}
    report["batch_errors"] = batch_errors(mesh, files)
    if len(devices) == 8:
        report["make_mesh"] = mesh_checks()
    for method in ("sft", "dpo"):
        config = make_config(mesh, files, method)
        model = stages.load_model(config)  # a fresh copy per run: train() donates model.params
        report[f"{method}_init_fingerprint"] = reflib.params_fingerprint(model.params)
        started = time.time()
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as workdir:
            os.environ["KWJAX_CACHE"] = cache  # this run's own reference cache
            result = trainlib.train(config, method, workdir, model, progress=False, devices=devices)
            if method == "dpo":  # the reference was computed (not found in a shared cache) and cached
                report["dpo_reference_cache_files"] = len(list(pathlib.Path(cache).glob("reference_logps/*.npy")))
        report["timings"][method] = round(time.time() - started, 2)
        assert result.final_step == 2, result.final_step
        steps = [h for h in result.metrics if "loss" in h]
        evals = [h for h in result.metrics if "eval_loss" in h]
        assert [h["step"] for h in steps] == [1, 2], steps
        assert len(evals) == 1, evals
        arrays[f"{method}/loss"] = np.array([h["loss"] for h in steps], np.float64)
        arrays[f"{method}/grad_norm"] = np.array([h["grad_norm"] for h in steps], np.float64)
        arrays[f"{method}/eval_loss"] = np.array([evals[0]["eval_loss"]], np.float64)
        report[f"{method}_shardings"] = check_shardings(result.params, mesh, len(devices))
        for keys, x in jax.tree_util.tree_leaves_with_path(result.params):
            arrays[f"{method}/params/{sharding.param_path(keys)}"] = np.asarray(jax.device_get(x))
        del result, model
    np.savez(out_dir / f"{tag}.npz", **arrays)
    (out_dir / f"{tag}.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out_dir = pathlib.Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    assert len(jax.devices()) == 8, jax.devices()
    meshes = [tuple(int(v) for v in m.split(",")) for m in argv[1:]]
    with tempfile.TemporaryDirectory() as root:
        files = write_data(pathlib.Path(root))
        for mesh in meshes:
            assert len(mesh) == 3, mesh
            run_mesh(mesh, files, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
