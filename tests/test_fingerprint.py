"""kwjax.fingerprint against hashlib directly: the hex values name workdirs and caches already on disk,
so they must be the bytes the earlier inline code hashed, not merely stable."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from kwjax.batching import Sequence_
from kwjax.fingerprint import digest_bytes_iter, digest_json, digest_params, digest_rows


def test_digest_json_is_blake2b_12_of_sorted_json():
    obj = {"method": "sft", "config": {"seed": 3, "lr": 1e-3, "path": None, "seeds": (0, 1)}}
    ref = hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
    assert digest_json(obj) == ref
    assert len(ref) == 24


def test_digest_json_ignores_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": "z"}}
    b = {"a": {"x": "z", "y": [1, 2]}, "b": 1}
    assert digest_json(a) == digest_json(b)
    assert digest_json(a) != digest_json({"b": 2, "a": {"y": [1, 2], "x": "z"}})


def test_digest_bytes_iter_is_the_concatenation():
    assert digest_bytes_iter([b"ab", b"", b"cd"]) == hashlib.blake2b(b"abcd", digest_size=16).hexdigest()
    assert digest_bytes_iter([b"x"], size=8) == hashlib.blake2b(b"x", digest_size=8).hexdigest()


def test_digest_params_hashes_path_then_bytes_per_leaf():
    params = {"layer_0": {"mlp": {"up": np.arange(6, dtype=np.float32).reshape(2, 3)}},
              "embedding": np.ones((2, 2), np.float32)}
    h = hashlib.blake2b(digest_size=16)
    # jax flattens dicts in sorted key order; keystr writes the path as ['a']['b'].
    h.update(b"['embedding']")
    h.update(params["embedding"].tobytes())
    h.update(b"['layer_0']['mlp']['up']")
    h.update(params["layer_0"]["mlp"]["up"].tobytes())
    assert digest_params(params, np.asarray) == h.hexdigest()


def test_digest_rows_hashes_json_of_ids_and_token_ids():
    a, b = Sequence_((2, 5), (7, 1)), Sequence_((2, 5), (9,))
    h = hashlib.blake2b(digest_size=16)
    h.update(b'["r1", [2, 5], [7, 1]]')
    h.update(b'["r2", [2, 5], [9]]')
    assert digest_rows(["r1", "r2"], [a, b], "sft") == h.hexdigest()
    h = hashlib.blake2b(digest_size=16)
    h.update(b'["p1", [2, 5], [7, 1], [2, 5], [9]]')
    assert digest_rows(["p1"], [(a, b)], "dpo") == h.hexdigest()
