"""Gemma 3 text-model configuration, read from the checkpoint that comes with the weights.

Sizes are never hard-coded in the model: a `ModelConfig` is built from a Hugging Face `config.json`
(both the transformers 4.x keys and the 5.x `rope_parameters` form, text-only or multimodal), from GGUF
metadata, or from a preset. The presets exist for tests and for users who want the published shapes
without a checkpoint; loading real weights always uses the checkpoint's own config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


class ConfigError(ValueError):
    """A checkpoint's configuration is missing, malformed or not a Gemma 3 text model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    query_pre_attn_scalar: float
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scale: float = 1.0  # linear scaling factor on global layers (8 for 4B and larger)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32_768
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, GLOBAL})
        if bad:
            raise ConfigError(f"unknown layer types {bad}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * h
        per_layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * per_layer + d

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Reads transformers' Gemma3TextConfig (4.x or 5.x keys), or the text part of Gemma3Config."""
        cfg = dict(raw)
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            cfg = dict(cfg["text_config"] or {})
            cfg.setdefault("model_type", "gemma3_text")
        model_type = cfg.get("model_type")
        if model_type not in ("gemma3_text", None):
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; kwjax loads Gemma 3 text models "
                "(model_type 'gemma3_text' or 'gemma3')"
            )

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return cfg[key]

        num_layers = int(need("num_hidden_layers"))
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            layer_types = [SLIDING if (i + 1) % pattern else GLOBAL for i in range(num_layers)]
        rope_local, rope_global, global_scale = _hf_rope(cfg, source)
        head_dim = int(cfg.get("head_dim") or need("hidden_size") // need("num_attention_heads"))
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(
                f"{source}: hidden_activation {cfg['hidden_activation']!r} is not Gemma 3's gelu (tanh)"
            )
        eos = cfg.get("eos_token_id", 1)
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=int(need("num_attention_heads")),
            num_kv_heads=int(need("num_key_value_heads")),
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            sliding_window=int(need("sliding_window")),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", head_dim)),
            rope_local_base=rope_local,
            rope_global_base=rope_global,
            rope_global_scale=global_scale,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32_768)),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
            pad_id=int(cfg.get("pad_token_id", 0) or 0),
            eos_id=int(eos[0] if isinstance(eos, list) else eos),
            bos_id=int(cfg.get("bos_token_id", 2)),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' Gemma3ForCausalLM reads back to the same architecture."""
        global_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_global_base}
        if self.rope_global_scale != 1.0:
            global_rope = {"rope_type": "linear", "factor": self.rope_global_scale,
                           "rope_theta": self.rope_global_base}
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar),
            "rope_parameters": {
                GLOBAL: global_rope,
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base},
            },
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "final_logit_softcapping": self.final_logit_softcap,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
            "bos_token_id": self.bos_id,
            "tie_word_embeddings": True,
            "attention_bias": False,
        }

    # ---- GGUF metadata ------------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], vocab_size: int, *, source: str) -> "ModelConfig":
        """Builds the config from llama.cpp metadata, filling what GGUF leaves implicit for Gemma 3.

        GGUF stores neither the layer pattern, the local RoPE base nor the query scale; llama.cpp
        hard-codes them for `gemma3` (every 6th layer global, local base 10k, scale head_dim**-0.5
        except 27B, which uses hidden/heads), and so does this reader.
        """
        arch = fields.get("general.architecture")
        if arch != "gemma3":
            raise ConfigError(
                f"{source}: GGUF architecture is {arch!r}; kwjax loads Gemma 3 text models ('gemma3')"
            )

        def need(key: str) -> Any:
            full = f"gemma3.{key}"
            if full not in fields:
                raise ConfigError(f"{source}: GGUF metadata lacks {full!r}")
            return fields[full]

        num_layers = int(need("block_count"))
        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        head_dim = int(fields.get("gemma3.attention.key_length", hidden // heads))
        scalar = hidden / heads if num_layers == 62 else head_dim
        scale = fields.get("gemma3.rope.scaling.factor")
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(fields.get("gemma3.attention.head_count_kv", heads)),
            head_dim=head_dim,
            layer_types=tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(num_layers)),
            sliding_window=int(need("attention.sliding_window")),
            query_pre_attn_scalar=float(scalar),
            rope_local_base=10_000.0,
            rope_global_base=float(fields.get("gemma3.rope.freq_base", 1_000_000.0)),
            rope_global_scale=float(scale) if scale else 1.0,
            rms_norm_eps=float(fields.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(fields.get("gemma3.context_length", 32_768)),
            pad_id=int(fields.get("tokenizer.ggml.padding_token_id", 0)),
            eos_id=int(fields.get("tokenizer.ggml.eos_token_id", 1)),
            bos_id=int(fields.get("tokenizer.ggml.bos_token_id", 2)),
        )


def _int_if_whole(x: float) -> int | float:
    """transformers' strict config wants an int where the value is whole (e.g. query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else x


def _hf_rope(cfg: Mapping[str, Any], source: str) -> tuple[float, float, float]:
    """(local base, global base, global linear factor) from either transformers generation of keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:
        glob = params.get(GLOBAL) or {}
        loc = params.get(SLIDING) or {}
        local_base = float(loc.get("rope_theta", 10_000.0))
        global_base = float(glob.get("rope_theta", 1_000_000.0))
        scaling = glob
    else:
        local_base = float(cfg.get("rope_local_base_freq", 10_000.0))
        global_base = float(cfg.get("rope_theta", 1_000_000.0))
        scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return local_base, global_base, 1.0
    if rope_type == "linear":
        return local_base, global_base, float(scaling["factor"])
    raise ConfigError(f"{source}: RoPE type {rope_type!r} is not used by Gemma 3 (expected default or linear)")


def _preset(num_layers: int, hidden: int, ffn: int, heads: int, kv: int, window: int, *,
            scalar: float = 256.0, global_scale: float = 1.0, vocab: int = 262_144,
            head_dim: int = 256) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=num_layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        layer_types=tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(num_layers)),
        sliding_window=window, query_pre_attn_scalar=scalar, rope_global_scale=global_scale,
    )


PRESETS = {
    "gemma3-270m": lambda: _preset(18, 640, 2048, 4, 1, 512),
    "gemma3-1b": lambda: _preset(26, 1152, 6912, 4, 1, 512),
    "gemma3-4b": lambda: _preset(34, 2560, 10240, 8, 4, 1024, global_scale=8.0, vocab=262_208),
    "gemma3-12b": lambda: _preset(48, 3840, 15360, 16, 8, 1024, global_scale=8.0, vocab=262_208),
    "gemma3-27b": lambda: _preset(62, 5376, 21504, 32, 16, 1024, scalar=168.0, global_scale=8.0,
                                  vocab=262_208, head_dim=128),
}


def tiny(vocab_size: int = 512, *, sliding_window: int = 8, num_layers: int = 4,
         num_kv_heads: int = 2) -> ModelConfig:
    """A few-layer Gemma 3 for tests: both layer types, GQA, and a window short enough to cross."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=num_layers,
        num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
        layer_types=tuple(SLIDING if (i + 1) % 3 else GLOBAL for i in range(num_layers)),
        sliding_window=sliding_window, query_pre_attn_scalar=16.0,
        rope_global_scale=1.0, max_position_embeddings=1024,
    )
