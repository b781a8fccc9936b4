"""Analytic matmul FLOPs of a Gemma 3 forward pass and of an SFT or DPO optimizer step.

Counted: every matrix multiplication, 2 FLOPs per multiply-add. Not counted: norms, RoPE, softmax,
activations, the embedding gather and the optimizer update (all linear in the parameter or activation
count, a few percent of the total at these sizes). Per forward pass, for a batch of `rows` sequences of
`seq_len` tokens:

  layers     2 · P_layer · L · rows · seq_len        P_layer: q, k, v, o and the three MLP matrices
  attention  4 · N · H · L · rows · seq_len · keys   scores q·kᵀ and the weighted sum p·v
  vocabulary 2 · V · D · rows · logit_positions      the tied output projection

`keys` is the number of key positions each query is scored against. kwjax (and transformers' eager and
SDPA paths on CPU) compute the full seq_len × seq_len score matrix and mask it, so the default counts
it dense; `causal=True` counts only the visible keys (the lower triangle, capped by the sliding window).
`logit_positions` is where the vocabulary projection runs: kwjax's response-only log-probs project the
response positions alone; a trainer that projects every position but the last projects seq_len − 1.

A training step is the forward, plus a backward of twice its FLOPs (a gradient for the activations and
one for the weights of every matmul), plus, for DPO with the reference computed on the fly, one more
forward of the reference without gradient. These are *model* FLOPs (the MFU convention). What the
hardware executes can be more: a rematerialised (recomputed) forward in the backward pass, e.g.
kwjax's vocabulary chunks (`jax.checkpoint` per chunk) or `remat=True` layers, is reported separately
as `recomputed`.
"""

from __future__ import annotations

import dataclasses

from kwjax.models.gemma3.config import ModelConfig


def layer_matmul_params(config: ModelConfig) -> int:
    """Weights that multiply activations in one decoder layer (norm scales excluded)."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    attn = d * h * (2 * config.num_heads + 2 * config.num_kv_heads)  # q, o (N heads); k, v (K heads)
    return attn + 3 * d * f  # gate, up, down


def _visible_keys(seq_len: int, window: int | None, causal: bool) -> int:
    """Sum over queries of the keys each is scored against."""
    if not causal:
        return seq_len * seq_len
    total = 0
    for q in range(seq_len):
        visible = q + 1
        if window is not None:
            visible = min(visible, window)
        total += visible
    return total


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    layers: int
    attention: int
    vocabulary: int

    @property
    def total(self) -> int:
        return self.layers + self.attention + self.vocabulary

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "attention": self.attention, "vocabulary": self.vocabulary,
                "total": self.total}


def forward_flops(config: ModelConfig, *, rows: int, seq_len: int, logit_positions: int,
                  causal: bool = False) -> ForwardFlops:
    """Matmul FLOPs of one forward pass over `rows` sequences of `seq_len` tokens.

    `logit_positions` is per row: how many positions are projected onto the vocabulary.
    """
    tokens = rows * seq_len
    layers = 2 * layer_matmul_params(config) * config.num_layers * tokens
    qh = config.num_heads * config.head_dim
    attention = 0
    for layer in range(config.num_layers):
        window = config.sliding_window if config.is_sliding(layer) else None
        attention += 4 * qh * rows * _visible_keys(seq_len, window, causal)
    vocabulary = 2 * config.vocab_size * config.hidden_size * rows * logit_positions
    return ForwardFlops(layers, attention, vocabulary)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one optimizer step, and the FLOPs a recomputing implementation adds on top."""

    forward: ForwardFlops  # the trained model's forward over the whole batch
    reference_forward: int  # DPO on the fly: the reference's forward (no backward); else 0
    recomputed: int  # forward work redone in the backward pass (rematerialisation); not model FLOPs

    @property
    def model(self) -> int:
        return 3 * self.forward.total + self.reference_forward

    @property
    def executed(self) -> int:
        return self.model + self.recomputed

    def as_dict(self) -> dict:
        return {"forward": self.forward.as_dict(), "backward": 2 * self.forward.total,
                "reference_forward": self.reference_forward, "model_flops": self.model,
                "recomputed": self.recomputed, "executed_flops": self.executed}


def train_step_flops(config: ModelConfig, *, method: str, batch: int, prompt_len: int, response_len: int,
                     logits: str = "response", reference: str = "precomputed", remat: bool = False,
                     vocab_recompute: bool = True, causal: bool = False) -> StepFlops:
    """FLOPs of one SFT or DPO optimizer step on `batch` examples (SFT) or pairs (DPO).

    `logits`: "response" projects only the response positions (kwjax), "all" every position but the
    last (a trainer that scores the whole shifted sequence, as TRL does on CPU). `reference`:
    "precomputed" (no reference forward in the step) or "on_the_fly". `vocab_recompute`: the vocabulary
    projection's forward is recomputed in the backward pass (kwjax's checkpointed chunks; TRL's fused
    head likewise); `remat`: the layers are recomputed too.
    """
    if method not in ("sft", "dpo"):
        raise ValueError(f"method is {method!r}; expected sft or dpo")
    if logits not in ("response", "all"):
        raise ValueError(f"logits is {logits!r}; expected response or all")
    if reference not in ("precomputed", "on_the_fly"):
        raise ValueError(f"reference is {reference!r}; expected precomputed or on_the_fly")
    rows = batch if method == "sft" else 2 * batch
    seq_len = prompt_len + response_len
    positions = response_len if logits == "response" else seq_len - 1
    fwd = forward_flops(config, rows=rows, seq_len=seq_len, logit_positions=positions, causal=causal)
    ref = fwd.total if method == "dpo" and reference == "on_the_fly" else 0
    recomputed = (fwd.vocabulary if vocab_recompute else 0) + (fwd.layers + fwd.attention if remat else 0)
    return StepFlops(fwd, ref, recomputed)


def tokens_per_step(method: str, batch: int, prompt_len: int, response_len: int) -> int:
    """Tokens processed by one step: every token of every sequence (DPO: chosen and rejected rows)."""
    rows = batch if method == "sft" else 2 * batch
    return rows * (prompt_len + response_len)


def matmul_fraction(flops: float, seconds: float, matmul_flops_per_s: float) -> float:
    """The fraction of a measured matmul rate that `flops` done in `seconds` reach (MFU against it)."""
    return flops / seconds / matmul_flops_per_s
