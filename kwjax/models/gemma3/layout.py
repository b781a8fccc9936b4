"""One table relating Hugging Face tensor names and layouts to kwjax's parameter tree.

HF (and GGUF, which keeps torch's [out, in] order) store projections as [out, in]; kwjax keeps
named head axes ([D, N, H] for queries, [N, H, D] for the output) so sharding rules can name them.
Both directions are here so loading and exporting cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from kwjax.models.gemma3.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str  # without the "model." prefix
    path: tuple[str, ...]  # path in the kwjax params tree
    to_kwjax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: tuple[int, ...]
    is_norm: bool = False


def _identity(x):
    return x


def entries(config: ModelConfig) -> list[Entry]:
    d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_heads,
                     config.num_kv_heads, config.head_dim)

    def heads_in(heads):  # [heads*h, d] -> [d, heads, h]
        return lambda w: w.T.reshape(d, heads, h)

    def heads_in_inv(heads):
        return lambda w: w.reshape(d, heads * h).T

    table = [Entry("embed_tokens.weight", ("embedding",), _identity, _identity, (config.vocab_size, d)),
             Entry("norm.weight", ("final_norm", "scale"), _identity, _identity, (d,), True)]
    for i in range(config.num_layers):
        pre, lay = f"layers.{i}.", f"layer_{i}"
        table += [
            Entry(pre + "self_attn.q_proj.weight", (lay, "attn", "q"), heads_in(n), heads_in_inv(n), (n * h, d)),
            Entry(pre + "self_attn.k_proj.weight", (lay, "attn", "k"), heads_in(k), heads_in_inv(k), (k * h, d)),
            Entry(pre + "self_attn.v_proj.weight", (lay, "attn", "v"), heads_in(k), heads_in_inv(k), (k * h, d)),
            Entry(pre + "self_attn.o_proj.weight", (lay, "attn", "o"),
                  lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T, (d, n * h)),
            Entry(pre + "self_attn.q_norm.weight", (lay, "attn", "query_norm", "scale"),
                  _identity, _identity, (h,), True),
            Entry(pre + "self_attn.k_norm.weight", (lay, "attn", "key_norm", "scale"),
                  _identity, _identity, (h,), True),
            Entry(pre + "input_layernorm.weight", (lay, "pre_attention_norm", "scale"),
                  _identity, _identity, (d,), True),
            Entry(pre + "post_attention_layernorm.weight", (lay, "post_attention_norm", "scale"),
                  _identity, _identity, (d,), True),
            Entry(pre + "pre_feedforward_layernorm.weight", (lay, "pre_ffw_norm", "scale"),
                  _identity, _identity, (d,), True),
            Entry(pre + "post_feedforward_layernorm.weight", (lay, "post_ffw_norm", "scale"),
                  _identity, _identity, (d,), True),
            Entry(pre + "mlp.gate_proj.weight", (lay, "mlp", "gate"), np.transpose, np.transpose, (f, d)),
            Entry(pre + "mlp.up_proj.weight", (lay, "mlp", "up"), np.transpose, np.transpose, (f, d)),
            Entry(pre + "mlp.down_proj.weight", (lay, "mlp", "down"), np.transpose, np.transpose, (d, f)),
        ]
    return table


GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF tensor name (without the "model." prefix)."""
    if hf_name.startswith("layers."):
        _, idx, rest = hf_name.split(".", 2)
        return f"blk.{idx}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf_name]
