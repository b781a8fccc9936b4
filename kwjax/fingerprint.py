"""Content fingerprints: blake2b over a canonical byte stream, as hex.

These values name things kept on disk between runs (an experiment workdir's finished pieces, the
cached reference log-probs), so the bytes each function feeds the hash are part of the on-disk format:
changing them silently orphans every cache and makes every workdir "made with other settings".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterable

import jax
import numpy as np


def digest_bytes_iter(chunks: Iterable[bytes], size: int = 16) -> str:
    """Hex digest of the chunks' concatenation, fed one at a time so no more than a chunk is in memory."""
    h = hashlib.blake2b(digest_size=size)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def digest_json(obj: Any, size: int = 12) -> str:
    """Of a JSON-able value, independent of dict key order (anything else hashes as its str())."""
    return digest_bytes_iter([json.dumps(obj, sort_keys=True, default=str).encode()], size)


def digest_params(params, to_host: Callable[[Any], np.ndarray]) -> str:
    """Of a params tree, whatever its sharding: leaf path, then leaf bytes, one leaf on the host at a time.

    `to_host` brings a leaf to a numpy array (`kwjax.distributed.to_host`; in a multi-process run it is
    a collective, so every process must call this)."""
    def chunks():
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            yield jax.tree_util.keystr(path).encode()
            yield to_host(leaf).tobytes()

    return digest_bytes_iter(chunks())


def digest_rows(ids: Iterable[str], items: Iterable, kind: str) -> str:
    """Of encoded rows (token ids, not text: the same text under another tokenizer is other data).

    `items` are `batching.Sequence_` for kind "sft", (chosen, rejected) pairs of them for "dpo"."""
    def chunks():
        for row_id, item in zip(ids, items):
            if kind == "sft":
                yield json.dumps([row_id, item.prompt, item.response]).encode()
            else:
                c, r = item
                yield json.dumps([row_id, c.prompt, c.response, r.prompt, r.response]).encode()

    return digest_bytes_iter(chunks())
