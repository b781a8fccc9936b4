"""The real Gemma 3 270M (shipped GGUF) against transformers' Gemma3ForCausalLM on the same file.

transformers dequantizes the GGUF and undoes llama.cpp's norm storage with its own code, so this
checks our GGUF reader and the model together against an independent implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwjax
from tests.conftest import ENGLISH, KOREAN, hf_logits, long_text

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def texts_ids(real_model):
    tok = real_model.tokenizer
    ids = {name: tok.encode(text, add_bos=True) for name, text in
           [("korean", KOREAN), ("english", ENGLISH), ("long", long_text())]}
    assert len(ids["long"]) > 512, "the long input must cross the 512-token sliding window"
    return ids


@pytest.mark.parametrize("name", ["korean", "english", "long"])
def test_float32_logits_match_transformers(real_model, hf_reference, texts_ids, name):
    tokens = np.asarray(texts_ids[name])[None]
    ours = real_model.logits(tokens)
    ref = hf_logits(hf_reference, tokens)
    assert np.abs(ours - ref).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_padded_batch_matches_transformers(real_model, hf_reference, texts_ids):
    rows = [texts_ids["korean"], texts_ids["english"]]
    width = max(map(len, rows))
    tokens = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    ours = real_model.logits(tokens, mask)
    ref = hf_logits(hf_reference, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-3


def test_bfloat16_top1_agrees_on_99_percent(real_model, hf_reference, texts_ids):
    bf16 = kwjax.LoadedModel(real_model.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                              real_model.params), None, "bf16")
    agree, total = 0, 0
    for name in ("korean", "english", "long"):
        tokens = np.asarray(texts_ids[name])[None]
        ref = hf_logits(hf_reference, tokens).argmax(-1)
        agree += int((bf16.logits(tokens).argmax(-1) == ref).sum())
        total += ref.size
    assert agree / total >= 0.99, f"bf16 top-1 agreement {agree / total:.4f}"


def test_gguf_config_matches_published_270m(real_model):
    cfg = real_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window) == (4, 1, 256, 512)
    assert cfg.vocab_size == 262_144 and cfg.layer_types.count("full_attention") == 3


def test_export_round_trip(real_model, hf_reference, tmp_path):
    """kwjax -> HF directory: transformers on the export computes what it computes on the source
    GGUF (same implementation, so 1e-5 is meaningful), and kwjax reads back identical params."""
    import chex
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = kwjax.export_hf(real_model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = real_model.tokenizer.encode(KOREAN, add_bos=True)
    assert tok(KOREAN)["input_ids"] == ids
    tokens = np.asarray(ids)[None]
    exported = hf_logits(hf, tokens)
    np.testing.assert_allclose(exported, hf_logits(hf_reference, tokens), atol=1e-5, rtol=0)
    assert np.abs(real_model.logits(tokens) - exported).max() <= 1e-3
    back = kwjax.load(out)
    chex.assert_trees_all_equal(back.params, real_model.params)
    assert back.tokenizer.encode(ENGLISH) == real_model.tokenizer.encode(ENGLISH)
