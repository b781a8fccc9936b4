"""LoRA (Hu et al. 2021): low-rank adapters as the trainable tree, the whole base model frozen.

For a target weight W (e.g. `layer_3/attn/q`, [D, N, H]) the adapters are A [in, r] and B [r, out]
(in = W's contracted input dims, out = the rest, flattened) and the model uses W + (α/r)·(A B). B
starts at zero, so step 0 is exactly the base model; A starts uniform in ±1/√in (PEFT's default).

Training keeps the adapters apart from W: the model adds (x A)(α/r) B beside each target's x W
(`forward_trees`, the model's `lora` collection), so the backward pass differentiates x W for x alone
and never forms W's gradient (until 2026-12-08 the product was added to W first, and every LoRA step
paid for a full weight gradient per target). Exports, evaluation and sampling use the merged weights
W + (α/r)·A B (`combine`): the same function, to float32 rounding (tested). The reference of a
preference stage is "adapters off": the frozen tree alone, with no copy and no separate pass.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kwjax.partition import PartitionError, merge, same_leaves

# target name -> (parameter name under each layer, how many leading dims of the weight are its input)
TARGETS = {"q": ("attn", "q", 1), "k": ("attn", "k", 1), "v": ("attn", "v", 1), "o": ("attn", "o", 2),
           "gate": ("mlp", "gate", 1), "up": ("mlp", "up", 1), "down": ("mlp", "down", 1)}


@dataclasses.dataclass(frozen=True)
class LoRA:
    """The LoRA split of a Gemma 3 params tree: `split` makes fresh adapters, `combine` adds their
    products to the frozen weights. Adapters are `{layer_i: {attn|mlp: {name: {"a": A, "b": B}}}}`."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _targets_in(self, params: dict):
        """(layer key, block, name, input dims, weight) for every target weight of the tree."""
        for layer in sorted(k for k in params if k.startswith("layer_")):
            for t in self.targets:
                block, name, n_in = TARGETS[t]
                w = params[layer].get(block, {}).get(name)
                if w is not None:
                    yield layer, block, name, n_in, w

    def split(self, params: dict) -> tuple[dict, dict]:
        """(fresh adapters as host arrays, the whole base tree): the same for every process (seeded)."""
        rng = np.random.default_rng([self.seed, 0x10A])
        adapters: dict = {}
        for layer, block, name, n_in, w in self._targets_in(params):
            fan_in = math.prod(w.shape[:n_in])
            fan_out = math.prod(w.shape[n_in:])
            bound = 1.0 / math.sqrt(fan_in)
            a = rng.uniform(-bound, bound, size=(fan_in, self.rank)).astype(w.dtype)
            b = np.zeros((self.rank, fan_out), w.dtype)
            adapters.setdefault(layer, {}).setdefault(block, {})[name] = {"a": a, "b": b}
        return adapters, params

    def combine(self, trainable: dict, frozen: dict) -> dict:
        """The frozen tree with every target weight replaced by W + (α/r)·A B (`partition.merge`)."""
        updated = {layer: {block: {name: self._updated(frozen[layer][block][name], ab) for name, ab in names.items()}
                           for block, names in blocks.items()} for layer, blocks in trainable.items()}
        return merge(frozen, updated)

    def forward_trees(self, trainable: dict, frozen: dict) -> tuple[dict, dict]:
        """(the frozen tree as it is, the adapters with α/r folded into A): the step adds (x A) B beside
        each target's x W (`Gemma3`'s `plus_adapter`), so W's own gradient is never formed."""
        def scaled(ab):
            return {"a": ab["a"] * jnp.asarray(self.scale, ab["a"].dtype), "b": ab["b"]}

        return frozen, jax.tree.map(scaled, trainable, is_leaf=lambda x: isinstance(x, dict) and "a" in x)

    def _updated(self, w, ab):
        delta = (ab["a"] @ ab["b"]).reshape(w.shape) * jnp.asarray(self.scale, ab["a"].dtype)
        return w + delta.astype(w.dtype)

    def reference_tree(self, reference: dict, frozen: dict) -> dict:
        """Adapters off: nothing laid over the frozen base when the reference is the starting model;
        a whole other model replaces it otherwise."""
        return {} if same_leaves(reference, frozen) else reference

    def check(self, params) -> None:
        if not any(True for _ in self._targets_in(params)):
            raise PartitionError(f"lora.targets {','.join(self.targets)!r} name no weight of this model")
        for _, _, _, n_in, w in self._targets_in(params):
            small = min(math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:]))
            if self.rank > small:
                raise PartitionError(f"lora.rank {self.rank} is larger than a target weight's smaller side "
                                     f"({w.shape}: {small}); choose lora.rank <= {small}")

    def describe(self) -> dict:
        return {"lora": {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}}


def from_config(config) -> LoRA | None:
    """`config.lora` as a LoRA split, or None when `lora.rank` is 0 (full fine-tuning)."""
    c = config.get("lora")
    if c is None or c.rank == 0:
        return None
    if c.rank < 0:
        raise PartitionError(f"lora.rank is {c.rank}; expected a positive rank, or 0 for full fine-tuning")
    targets = tuple(t.strip() for t in str(c.targets).split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise PartitionError(f"lora.targets: unknown {unknown or '(none given)'}; expected some of "
                             f"{', '.join(TARGETS)} (comma-separated)")
    if c.dropout:
        raise PartitionError(f"lora.dropout is {c.dropout}: LoRA dropout is not implemented (the train step "
                             "carries no dropout randomness); set lora.dropout=0")
    if not c.alpha > 0:
        raise PartitionError(f"lora.alpha is {c.alpha}; expected a positive scale (the update is alpha/rank·AB)")
    if config.get("freeze", ""):
        raise PartitionError("freeze and lora.rank > 0 both set: LoRA freezes the whole base model already")
    return LoRA(int(c.rank), float(c.alpha), targets, seed=int(config.seed))
