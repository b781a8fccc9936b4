"""Trainable embedding rows for a few named tokens, the rest of the tied embedding frozen.

Why: the embedded model is the *pretrained* Gemma 3 270M, and its chat-control tokens were never
trained. The row of `<end_of_turn>` has cosine > 0.99 with about 4.7k other rows (`<unusedN>` and rare
pieces such as `DrvGPIO`); `<start_of_turn>` lies near it (cosine 0.95; docs/recipe-270m/README.md). The
embedding is tied, so with it frozen a hidden state that scores `<end_of_turn>` high scores every row of
that cluster almost as high: a fine-tuned model that "wants" to stop emits `<unused824>` or `eleSp` about
as often as `<end_of_turn>`, and keeps writing. Training the rows of those few tokens (PEFT's
`trainable_token_indices`) lets them leave the cluster for K × D parameters.

The rows are a leaf `token_rows` [K, D] of the trainable tree, initialised to the frozen embedding's
rows; `combine` writes them into the embedding, so the model, its exports and its sampler see one
ordinary params tree. In the train step the output projection sees the embedding as a constant and the
rows' share of the gradient is added per response position (`losses.with_row_gradients`), so no
[V, D] gradient of the projection is formed; the input lookup's gradient reaches them through the write.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kwjax.distributed import to_host
from kwjax.partition import PartitionError

KEY = "token_rows"


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """`base` (a `Partition` that freezes the embedding, or LoRA) plus the trainable rows of `ids`."""

    base: Any
    ids: tuple[int, ...]
    pieces: tuple[str, ...]

    def _embedding_frozen(self) -> bool:
        is_frozen = getattr(self.base, "is_frozen", None)
        return is_frozen is None or is_frozen(("embedding",))  # LoRA freezes the whole base model

    def split(self, params: dict) -> tuple[dict, dict]:
        trainable, frozen = self.base.split(params)
        # A host copy (the frozen rows stay as they are), whole on every process.
        rows = to_host(jnp.take(params["embedding"], jnp.asarray(self.ids), axis=0))
        return {**trainable, KEY: rows}, frozen

    def combine(self, trainable: dict, frozen: dict) -> dict:
        return self._with_rows(self.base.combine(_without_rows(trainable), frozen), trainable[KEY])

    def forward_trees(self, trainable: dict, frozen: dict) -> tuple[dict, dict | None]:
        params, adapters = self.base.forward_trees(_without_rows(trainable), frozen)
        return self._with_rows(params, trainable[KEY]), adapters

    def _with_rows(self, params: dict, rows_KD) -> dict:
        embedding = params["embedding"]
        return {**params, "embedding": embedding.at[jnp.asarray(self.ids)].set(rows_KD.astype(embedding.dtype))}

    def output_rows(self, trainable: dict):
        """(ids_K, rows_KD) for the step's output projection (`losses.with_row_gradients`)."""
        return jnp.asarray(self.ids, jnp.int32), trainable[KEY]

    def reference_tree(self, reference: dict, frozen: dict) -> dict:
        """The reference is a whole model whose embedding holds its own rows: the base split's rule."""
        return self.base.reference_tree(reference, frozen)

    def check(self, params) -> None:
        self.base.check(params)
        if not self._embedding_frozen():
            raise PartitionError("train_tokens is set but the embedding is trained whole already; set "
                                 "freeze=embedding (or use LoRA), or train_tokens=''")
        vocab = params["embedding"].shape[0]
        bad = [i for i in self.ids if not 0 <= i < vocab]
        if bad:
            raise PartitionError(f"train_tokens: ids {bad} lie outside the vocabulary [0, {vocab})")

    def describe(self) -> dict:
        return {**self.base.describe(), KEY: list(self.pieces)}


def _without_rows(trainable: dict) -> dict:
    """The base split's part of a trainable tree (everything but the rows under `KEY`)."""
    return {k: v for k, v in trainable.items() if k != KEY}


def parse(spec: str, tokenizer) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """`"<start_of_turn>,<end_of_turn>"` (pieces, or integer ids) -> (ids, pieces), each once, in order."""
    ids: list[int] = []
    pieces: list[str] = []
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        if item.isdigit():
            token_id = int(item)
            try:
                piece = tokenizer.id_to_piece(token_id) if tokenizer is not None else None
            except (KeyError, IndexError):  # out of the vocabulary: `check` names it
                piece = None
            piece = piece if piece is not None else item
        else:
            if tokenizer is None:
                raise PartitionError(f"train_tokens: {item!r} is a token piece; without a tokenizer give ids")
            try:
                token_id = tokenizer.piece_to_id(item)
            except KeyError:
                token_id = None
            if token_id is None:
                raise PartitionError(f"train_tokens: {item!r} is not a token of this model's tokenizer "
                                     "(expected pieces such as <end_of_turn>, or integer ids, comma-separated)")
            piece = item
        if token_id not in ids:
            ids.append(token_id)
            pieces.append(piece)
    return tuple(ids), tuple(pieces)
