"""kwjax.flops: the analytic FLOPs count, by hand on a toy config and against XLA's own count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kwjax import flops, losses
from kwjax.models.gemma3.config import GLOBAL, SLIDING, ModelConfig
from tests.conftest import compiled_flops


def toy() -> ModelConfig:
    # vocab 10, hidden 4, MLP 6, 2 layers (sliding then global, window 2), 2 query heads, 1 KV head, head dim 2
    return ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=2, layer_types=(SLIDING, GLOBAL), sliding_window=2,
                       query_pre_attn_scalar=2.0)


def test_forward_by_hand():
    cfg = toy()
    # per layer: q 4·2·2 + k 4·1·2 + v 4·1·2 + o 2·2·4 = 16 + 8 + 8 + 16 = 48; MLP 3·4·6 = 72
    assert flops.layer_matmul_params(cfg) == 120
    f = flops.forward_flops(cfg, rows=2, seq_len=5, logit_positions=3)
    assert f.layers == 2 * 120 * 2 * (2 * 5)  # 2 FLOPs × params × layers × tokens = 4800
    assert f.attention == 4 * (2 * 2) * 2 * 2 * 25  # 4 × N·H × layers × rows × 5·5 keys (dense) = 1600
    assert f.vocabulary == 2 * 10 * 4 * 2 * 3  # 2 × V × D × rows × positions = 480
    assert f.total == 6880
    causal = flops.forward_flops(cfg, rows=2, seq_len=5, logit_positions=3, causal=True)
    # visible keys per query: sliding (window 2) 1+2+2+2+2 = 9, global 1+2+3+4+5 = 15
    assert causal.attention == 4 * 4 * 2 * (9 + 15)


def test_steps_by_hand():
    cfg = toy()
    sft = flops.train_step_flops(cfg, method="sft", batch=2, prompt_len=2, response_len=3)
    fwd = flops.forward_flops(cfg, rows=2, seq_len=5, logit_positions=3)
    assert sft.forward == fwd and sft.model == 3 * 6880 and sft.reference_forward == 0
    assert sft.recomputed == fwd.vocabulary and sft.executed == 3 * 6880 + 480
    # TRL-style: every position but the last is projected onto the vocabulary
    all_pos = flops.train_step_flops(cfg, method="sft", batch=2, prompt_len=2, response_len=3, logits="all")
    assert all_pos.forward.vocabulary == 2 * 10 * 4 * 2 * 4
    # DPO: 2 × batch rows; on the fly adds one reference forward without backward
    pre = flops.train_step_flops(cfg, method="dpo", batch=1, prompt_len=2, response_len=3)
    otf = flops.train_step_flops(cfg, method="dpo", batch=1, prompt_len=2, response_len=3, reference="on_the_fly")
    assert pre.model == 3 * 6880 and otf.model == 4 * 6880
    remat = flops.train_step_flops(cfg, method="sft", batch=2, prompt_len=2, response_len=3, remat=True)
    assert remat.recomputed == 6880
    assert flops.tokens_per_step("dpo", 4, 48, 96) == 8 * 144 and flops.tokens_per_step("sft", 4, 48, 96) == 4 * 144
    with pytest.raises(ValueError):
        flops.train_step_flops(cfg, method="kto", batch=1, prompt_len=1, response_len=1)


def test_270m_numbers():
    """The benchmark's workload on Gemma 3 270M, as quoted in docs/PERFORMANCE.md."""
    from kwjax.models.gemma3.config import PRESETS

    cfg = PRESETS["gemma3-270m"]()
    assert flops.layer_matmul_params(cfg) * cfg.num_layers + cfg.vocab_size * cfg.hidden_size + \
        cfg.num_layers * (4 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size == cfg.num_params
    kw = flops.train_step_flops(cfg, method="dpo", batch=4, prompt_len=48, response_len=96)
    trl = flops.train_step_flops(cfg, method="dpo", batch=4, prompt_len=48, response_len=96, logits="all",
                                 reference="on_the_fly")
    # response-only log-probs project 96 of 143 positions; a reference forward adds a third to the model FLOPs
    assert kw.forward.vocabulary * 143 == trl.forward.vocabulary * 96
    assert 1.5 < trl.model / kw.model < 2.0


# XLA's cost analysis counts every op, elementwise ones too (norms, softmax, RoPE, GELU): on this
# matmul-dominated small config the analytic matmul count is within a few percent of it. The
# vocabulary chunk loop is a while loop, whose body XLA counts once, so one chunk spans the response.
XLA_TOLERANCE = 0.05


def _xla_flops(fn, *args) -> float:
    return compiled_flops(jax.jit(fn).lower(*args).compile())


def test_against_xla_cost_analysis():
    from kwjax.models.gemma3.model import Gemma3, init_params

    cfg = ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, layer_types=(SLIDING, GLOBAL), sliding_window=16,
                      query_pre_attn_scalar=32.0)
    rows, seq, resp = 2, 48, 32
    params = init_params(cfg, jax.random.PRNGKey(0))
    module = Gemma3(cfg)
    tokens = jnp.ones((rows, seq), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq), (rows, seq))
    idx = jnp.broadcast_to(jnp.arange(seq - resp - 1, seq - 1), (rows, resp))
    targets, mask = jnp.ones((rows, resp), jnp.int32), jnp.ones((rows, resp), bool)

    def logits(p):
        return module.apply({"params": p}, tokens, pos)

    def loss(p):
        hidden = module.apply({"params": p}, tokens, pos, return_hidden=True)
        return losses.response_logps(hidden, p["embedding"], idx, targets, mask, chunk=resp).logps_B.sum()

    every = flops.forward_flops(cfg, rows=rows, seq_len=seq, logit_positions=seq)
    assert _xla_flops(logits, params) == pytest.approx(every.total, rel=XLA_TOLERANCE)
    step = flops.train_step_flops(cfg, method="sft", batch=rows, prompt_len=seq - resp, response_len=resp)
    assert _xla_flops(loss, params) == pytest.approx(step.forward.total, rel=XLA_TOLERANCE)
    assert _xla_flops(jax.grad(loss), params) == pytest.approx(step.model, rel=XLA_TOLERANCE)
