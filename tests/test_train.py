"""Training on a tiny random Gemma 3 with the real tokenizer: equivalences, resume, failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwjax.models.gemma3 import config as config_lib
from kwjax import stages
from kwjax import step as steplib
from kwjax import train as T
from kwjax.batching import BatchError
from kwjax.checkpoint import Checkpointer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))


def losses_of(result):
    return [m["loss"] for m in result.metrics if "loss" in m]


def run(cfg, method, workdir, **kw):
    return T.train(cfg, method, workdir, stages.load_model(cfg), progress=False, **kw)


def test_precomputed_and_on_the_fly_reference_agree(tmp_path):
    a = run(tiny_config(), "dpo", tmp_path / "pre")
    b = run(tiny_config(**{"dpo.reference": "on_the_fly"}), "dpo", tmp_path / "fly")
    assert len(losses_of(a)) == 3
    chex.assert_trees_all_close(losses_of(a), losses_of(b), atol=1e-5)
    assert abs(losses_of(a)[0] - np.log(2)) < 1e-5  # step 1: policy = reference


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    # Adam divides by sqrt(v) + eps: with the default eps=1e-8, embedding rows whose gradient is pure
    # float noise (~1e-9) get lr-sized updates of arbitrary sign, so two summation orders differ by
    # ~lr there. A larger eps keeps updates proportional to gradients, so parameters can be compared
    # tightly; the gradients themselves are what accumulation must reproduce.
    for method in ("sft", "dpo"):
        one = run(tiny_config(max_steps=2, **{"optimizer.eps": 1e-3}), method, tmp_path / f"{method}1")
        acc = run(tiny_config(max_steps=2, grad_accum=2, **{"optimizer.eps": 1e-3}), method, tmp_path / f"{method}2")
        chex.assert_trees_all_close(losses_of(one), losses_of(acc), atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(one.params, acc.params, atol=1e-5, rtol=1e-4)


def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config(max_steps=4, checkpoint_every=2)
    full = run(cfg, "dpo", tmp_path / "full")
    part = run(cfg, "dpo", tmp_path / "part", interrupt_at=2)
    assert part.interrupted and part.final_step == 2
    with pytest.raises(T.TrainingError, match="already holds checkpoints.*--resume"):
        run(cfg, "dpo", tmp_path / "part")
    rest = run(cfg, "dpo", tmp_path / "part", resume=True)
    assert rest.final_step == 4
    chex.assert_trees_all_close(losses_of(rest), losses_of(full)[2:], atol=1e-5)
    chex.assert_trees_all_close(rest.params, full.params, atol=1e-5)


def test_length_grouped_batches_resume_exactly(tmp_path):
    cfg = tiny_config(max_steps=4, checkpoint_every=2, **{"data.group_by_length": 16})
    full = run(cfg, "sft", tmp_path / "full")
    part = run(cfg, "sft", tmp_path / "part", interrupt_at=2)
    assert part.interrupted and part.final_step == 2
    rest = run(cfg, "sft", tmp_path / "part", resume=True)
    chex.assert_trees_all_close(losses_of(rest), losses_of(full)[2:], atol=1e-5)
    plain = run(tiny_config(max_steps=4), "sft", tmp_path / "plain")  # other batches: other losses
    assert not np.allclose(losses_of(plain), losses_of(full), atol=1e-4)


def test_sft_loss_falls_and_dpo_raises_margins(tmp_path):
    sft = run(tiny_config(max_steps=12, epochs=10, **{"data.train_limit": 8, "sft.learning_rate": 3e-3}),
              "sft", tmp_path / "sft")
    l = losses_of(sft)
    assert np.mean(l[-3:]) < np.mean(l[:3]) - 1.0, l
    dpo = run(tiny_config(max_steps=12, epochs=10, **{"data.train_limit": 8, "dpo.learning_rate": 3e-3}),
              "dpo", tmp_path / "dpo")
    margins = [m["rewards/margins"] for m in dpo.metrics if "rewards/margins" in m]
    assert abs(margins[0]) < 1e-4 and np.mean(margins[-3:]) > 0.5, margins


def test_metrics_jsonl_and_exports(tmp_path):
    summary = stages.run(tiny_config(export_hf=True), "sft_dpo", tmp_path / "run", progress=False)
    assert set(summary) == {"sft", "dpo"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*rows)
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm",
                 "learning_rate", "num_tokens", "eval_loss", "eval_rewards/margins"):
        assert name in names, name
    assert list((tmp_path / "run" / "dpo" / "tensorboard").iterdir())
    import kwjax

    for sub in ("model", "hf"):
        back = kwjax.load(tmp_path / "run" / "dpo" / sub)
        assert back.config.num_layers == 3


def test_rows_longer_than_the_limit(tmp_path):
    cfg = tiny_config(**{"data.too_long": "error", "data.max_length": 40})
    with pytest.raises(BatchError, match=r"row kl-\d+: the (chosen )?sequence has \d+ tokens .* over data.max_length=40"):
        run(cfg, "dpo", tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Warmup from 0 makes step 1 harmless (a good checkpoint); the huge peak rate then overflows.
    cfg = tiny_config(max_steps=6, checkpoint_every=1, **{"sft.learning_rate": 1e30, "optimizer.clip_norm": 0.0,
                                                           "optimizer.warmup_ratio": 0.5})
    with pytest.raises(T.TrainingError, match=r"(loss|grad_norm|param_norm) is (nan|inf) at step \d+ .*"
                                              r"last good checkpoint \(step \d+\)"):
        run(cfg, "sft", tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    step = ckpt.latest_step()
    assert step is not None
    leaves = jax.tree.leaves(ckpt.manager.restore(step)["state"]["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_failed_save_keeps_the_last_good_checkpoint_and_resumes(tmp_path, monkeypatch):
    # What Orbax raised when a real checkpoint outgrew a 60 MB tmpfs (TensorStore's error, a ValueError).
    full_disk = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0.0" in OCDBT database: Failed to write '
                           "8794112 bytes to file 14: No space left on device [os_error_code='28']")
    real_save = Checkpointer.save
    disk = {"full": True}

    def save(self, step, state, meta):
        if step == 3 and disk["full"]:
            raise full_disk
        real_save(self, step, state, meta)

    monkeypatch.setattr(Checkpointer, "save", save)
    cfg = tiny_config(max_steps=4, checkpoint_every=1)
    with pytest.raises(T.TrainingError, match=r"could not save the checkpoint of step 3 in .*checkpoints: "
                                              r".*No space left on device.*last good checkpoint \(step 2\) is kept"):
        run(cfg, "sft", tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    disk["full"] = False
    resumed = run(cfg, "sft", tmp_path, resume=True)
    assert [m["step"] for m in resumed.metrics if "loss" in m] == [3, 4]
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4


def test_unknown_method_and_bad_settings(tmp_path):
    with pytest.raises(T.TrainingError, match="unknown method 'ppo'"):
        stages.run(tiny_config(), "ppo", tmp_path)
    with pytest.raises(T.TrainingError, match="must divide by grad_accum 3"):
        run(tiny_config(grad_accum=3), "sft", tmp_path)
    with pytest.raises(T.TrainingError, match="dpo.loss_type is 'kto'"):
        run(tiny_config(**{"dpo.loss_type": "kto"}), "dpo", tmp_path)
    with pytest.raises(T.TrainingError, match="checkpoint_every is -1; expected a step count, or 0"):
        run(tiny_config(checkpoint_every=-1), "sft", tmp_path)


def test_checkpoint_every_zero_saves_only_the_final_step(tmp_path):
    result = run(tiny_config(max_steps=3, checkpoint_every=0), "sft", tmp_path)
    assert result.final_step == 3
    assert list(Checkpointer(tmp_path / "checkpoints", keep=10).manager.all_steps()) == [3]


def train_cli(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ})


def test_cli_misspelt_config_key(tmp_path):
    r = train_cli("--method=sft", "--config=configs/tiny.py", "--config.batchsize=3", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "batchsize" in r.stderr and "Traceback" not in r.stderr[-2000:], r.stderr[-2000:]


def test_cli_sft_dpo_end_to_end(tmp_path):
    r = train_cli("--method=sft_dpo", "--config=configs/tiny.py", f"--workdir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["sft"]["final_step"] == 3 and summary["dpo"]["final_step"] == 3
    assert (tmp_path / "dpo" / "model" / "kwjax.json").is_file()


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    """SIGKILL a run that checkpoints every step, at varying moments; the latest finished one restores."""
    for delay in (0.0, 0.15, 0.35):
        work = tmp_path / f"kill{delay}"
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--method=sft",
                                 "--config=configs/tiny.py", "--config.max_steps=50", "--config.checkpoint_every=1",
                                 f"--workdir={work}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not (work / "checkpoints" / "2").exists():
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = Checkpointer(work / "checkpoints")
        step = ckpt.latest_step()
        assert step is not None and step >= 1
        state = ckpt.manager.restore(step)["state"]
        assert int(state["step"]) == step


def test_remat_gives_the_same_losses(tmp_path):
    plain = run(tiny_config(max_steps=2, remat=False), "sft", tmp_path / "plain")
    remat = run(tiny_config(max_steps=2, remat=True), "sft", tmp_path / "remat")
    chex.assert_trees_all_close(losses_of(plain), losses_of(remat), atol=1e-6)
    chex.assert_trees_all_close(plain.params, remat.params, atol=1e-6)
    # DPO's loss is β·(policy − reference) of sums over ~100 tokens: one compilation's rounding against
    # another's reaches 1e-5 there (as in test_precomputed_and_on_the_fly_reference_agree); its
    # gradient is float noise on many embedding rows, so eps is raised as in the accumulation test
    dpo = {"optimizer.eps": 1e-3}
    plain = run(tiny_config(max_steps=2, remat=False, **dpo), "dpo", tmp_path / "plain_dpo")
    remat = run(tiny_config(max_steps=2, remat=True, **dpo), "dpo", tmp_path / "remat_dpo")
    chex.assert_trees_all_close(losses_of(plain), losses_of(remat), atol=1e-5)
    chex.assert_trees_all_close(plain.params, remat.params, atol=1e-6)
    report = json.loads((tmp_path / "plain" / "data_report.json").read_text())
    assert report["train"]["rows"] == 16 and report["too_long"] == "truncate"


def step_temp_bytes(model_config, method: str, remat: bool, rows: int, seq_len: int, resp_len: int) -> int:
    """XLA's planned temporaries of the jitted, donating train step, compiled from shapes alone."""
    from kwjax import optimizer
    from kwjax.models.gemma3.model import Gemma3, param_shapes

    cfg = tiny_config(remat=remat)
    params = param_shapes(model_config)
    tx, lr = optimizer.make(cfg.optimizer, 1e-3, 10, params)
    state = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params)
    shapes = {"tokens_BT": ((rows, seq_len), jnp.int32), "valid_BT": ((rows, seq_len), jnp.bool_),
              "target_idx_BR": ((rows, resp_len), jnp.int32), "targets_BR": ((rows, resp_len), jnp.int32),
              "target_mask_BR": ((rows, resp_len), jnp.bool_), "example_mask_B": ((rows,), jnp.bool_),
              "ref_logps_B": ((rows,), jnp.float32)}
    batch = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items() if method == "dpo" or k != "ref_logps_B"}
    step = steplib.make_train_step(Gemma3(model_config, remat=remat), method, cfg, tx, lr, on_the_fly=False)
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def param_bytes(model_config) -> int:
    from kwjax.models.gemma3.model import param_shapes

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(param_shapes(model_config)))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_step_plan_holds_the_gradients_once(method):
    """With Gemma 3's 262k vocabulary the embedding is almost all the parameters: the step's
    temporaries are its gradient plus a little, not also a clipped copy of it (optax's chain: 2.0×)."""
    model_config = config_lib.tiny(vocab_size=262144, sliding_window=32, num_layers=3)
    temp = step_temp_bytes(model_config, method, remat=True, rows=8, seq_len=64, resp_len=32)
    assert temp < 1.4 * param_bytes(model_config), f"{temp / param_bytes(model_config):.2f}× the parameters"


def test_remat_holds_one_layer_of_activations_at_a_time():
    """Many tokens, small weights: without remat the plan holds every layer's activations; with it,
    each layer is recomputed in its turn of the backward pass (nn.remat's recomputation was scheduled
    right after the forward pass by XLA, and the plan did not shrink)."""
    model_config = config_lib.tiny(vocab_size=512, sliding_window=32, num_layers=6)
    plain = step_temp_bytes(model_config, "dpo", remat=False, rows=8, seq_len=256, resp_len=128)
    remat = step_temp_bytes(model_config, "dpo", remat=True, rows=8, seq_len=256, resp_len=128)
    assert remat < 0.35 * plain, f"remat {remat / 2**20:.1f} MiB vs {plain / 2**20:.1f} MiB without"


def test_capped_reference_pass_computes_only_the_rows_read_and_the_cache_fills_in(tmp_path):
    """tiny: 16 training pairs, batch 4, 3 steps read 12 of them; the others are never computed until a
    run asks for them, and the cache then holds all 16, equal to a full pass's values."""
    from kwjax import data as datalib, feed, reference as reflib, sharding
    from kwjax.models.gemma3.model import Gemma3

    cfg = tiny_config()
    run(cfg, "dpo", tmp_path / "capped")
    model = stages.load_model(cfg)
    rows, _ = datalib.split_rows(cfg, "dpo")
    data = feed.encode(rows, model.tokenizer, cfg, "dpo")
    cached = tmp_path / "cache" / "reference_logps" / f"{reflib.cache_key(data, model.params, cfg, model.dtype)}.npy"
    partial = np.load(cached)
    seen = feed.rows_seen(cfg.seed, data.lengths(), cfg.batch_size, cfg.data.group_by_length, 3)
    assert len(data.items) == 16 and len(seen) == 12
    assert np.isfinite(partial[seen]).all()
    assert np.isnan(np.delete(partial, seen, axis=0)).all()

    module, mesh = Gemma3(model.config, param_dtype=model.dtype), sharding.make_mesh()
    fresh = reflib.reference_logps(module, model.params, data, cfg, mesh, None, "full")  # no cache
    rest = np.setdiff1d(np.arange(16), seen)  # the 4 rows no step read: computed now, kept beside the 12
    reflib.reference_logps(module, model.params, data, cfg, mesh, cached.parent, "the other rows", rows=rest)
    assert np.isfinite(np.load(cached)).all()
    filled = reflib.reference_logps(module, model.params, data, cfg, mesh, cached.parent, "all rows")
    assert np.isfinite(filled).all()
    chex.assert_trees_all_close(filled, fresh, atol=1e-4, rtol=1e-6)
    chex.assert_trees_all_close(partial[seen], fresh[seen], atol=1e-4, rtol=1e-6)
