"""Which parameters a run trains, and which it only reads.

The train state, the optimizer, the gradients and the checkpoints hold the *trainable* tree; the
*frozen* tree is an argument of every step, read and never copied or updated. Full fine-tuning is the
case "nothing frozen" (`config.freeze = ""`); `config.freeze = "embedding"` keeps Gemma's tied
262k × D embedding (most of the 270M model's parameters) fixed, which drops its gradient and its two
AdamW moments from memory. Adapter methods (LoRA) plug in here: their trainable tree is the adapters,
the frozen tree the whole base model.

Both trees are nested dicts shaped like the model's params, holding disjoint leaves; `merge` puts them
back together for the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from kwjax.sharding import param_path


class PartitionError(ValueError):
    """A `freeze` setting that names nothing, or that leaves nothing to train."""


def merge(*trees: dict) -> dict:
    """One nested dict from several; a later tree's leaf wins where two hold the same path."""
    out: dict = {}
    for tree in trees:
        for key, value in (tree or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def _select(tree: dict, keep, prefix: tuple = ()) -> dict:
    """The sub-tree of the leaves whose path `keep` accepts (empty branches dropped)."""
    out: dict = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            sub = _select(value, keep, path)
            if sub:
                out[key] = sub
        elif keep(path):
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Partition:
    """Frozen = every parameter whose "/"-joined path (e.g. `layer_3/attn/q`, `embedding`) matches one
    of `frozen_patterns` (regular expressions, searched); the rest is trainable."""

    frozen_patterns: tuple[str, ...] = ()

    def is_frozen(self, path: tuple[str, ...]) -> bool:
        name = "/".join(path)
        return any(re.search(p, name) for p in self.frozen_patterns)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen): the same leaves, not copies."""
        if not self.frozen_patterns:
            return params, {}
        return (_select(params, lambda p: not self.is_frozen(p)), _select(params, self.is_frozen))

    def combine(self, trainable: dict, frozen: dict) -> dict:
        """The model's parameters from the two trees (here: put back together; an adapter method adds its
        product to the frozen weights instead)."""
        return merge(frozen, trainable)

    def forward_trees(self, trainable: dict, frozen: dict) -> tuple[dict, dict | None]:
        """What a training forward pass reads: (params, adapters), the adapters the model's `lora`
        collection (`Gemma3`'s `plus_adapter`) or None. Here the params are `combine`'s; an adapter
        method keeps its adapters apart, so no gradient of the frozen weights is ever formed."""
        return self.combine(trainable, frozen), None

    def check(self, params) -> None:
        """Every pattern names some parameter, and something is left to train."""
        names = [param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
        for pattern in self.frozen_patterns:
            if not any(re.search(pattern, n) for n in names):
                raise PartitionError(f"freeze: pattern {pattern!r} matches no parameter (names look like "
                                     f"{', '.join(names[:3])})")
        if all(self.is_frozen(tuple(n.split("/"))) for n in names):
            raise PartitionError(f"freeze={','.join(self.frozen_patterns)!r} freezes every parameter; "
                                 "nothing would be trained")

    def reference_tree(self, reference: dict, frozen: dict) -> dict:
        """What an on-the-fly reference passes to the step, laid over `frozen`: a copy of its trainable
        part (the policy's trainable buffers are donated to the step), and its frozen part only where
        that differs from the policy's (never a copy of the frozen tree)."""
        ref_t, ref_f = self.split(reference)
        tree = jax.tree.map(jnp.copy, ref_t)
        return tree if same_leaves(ref_f, frozen) else merge(ref_f, tree)

    def describe(self) -> dict:
        """What a checkpoint records, so a resume with another split is refused."""
        return {"freeze": list(self.frozen_patterns)}


def describe_text(record: dict) -> str:
    """A checkpoint's split in words, for errors."""
    rows = record.get("token_rows")
    extra = f" + trained rows of train_tokens={','.join(rows)!r}" if rows else ""
    if "lora" in record:
        lo = record["lora"]
        return (f"LoRA (lora.rank={lo['rank']}, lora.alpha={lo['alpha']:g}, lora.targets={','.join(lo['targets'])!r})"
                + extra)
    patterns = record.get("freeze", [])
    return (f"freeze={','.join(patterns)!r}" if patterns else "full fine-tuning (freeze='', lora.rank=0)") + extra


def from_config(config, tokenizer=None):
    """The configured split: LoRA when `lora.rank` > 0 (`kwjax.lora`), else `config.freeze`:
    comma-separated regular expressions over parameter paths ("" = train everything); either with the
    rows of `config.train_tokens` trained on top (`kwjax.token_rows`; pieces need the `tokenizer`)."""
    from kwjax import token_rows

    base = _base_from_config(config)
    spec = str(config.get("train_tokens", "") or "")
    if not spec.strip():
        return base
    ids, pieces = token_rows.parse(spec, tokenizer)
    return token_rows.TokenRows(base, ids, pieces) if ids else base


def _base_from_config(config):
    from kwjax import lora

    adapters = lora.from_config(config)
    if adapters is not None:
        return adapters
    spec = str(config.get("freeze", "") or "")
    patterns = tuple(p.strip() for p in spec.split(",") if p.strip())
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise PartitionError(f"freeze: {p!r} is not a regular expression ({e})") from None
    return Partition(patterns)


def same_leaves(a: Any, b: Any) -> bool:
    """True when two trees hold the very same arrays (not merely equal values)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x is y for x, y in zip(la, lb))
