"""Bad checkpoints: each gives a WeightsError that names the file and the problem."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import kwjax
from kwjax.models.gemma3 import config as cfglib
from kwjax.weights import WeightsError, hf


@pytest.fixture()
def tiny_dir(tmp_path):
    config = cfglib.tiny()
    params = kwjax.models.gemma3.model.init_params(config, jax.random.PRNGKey(0))
    hf.write(tmp_path / "ckpt", config, params)
    return tmp_path / "ckpt"


def test_missing_source(tmp_path):
    with pytest.raises(WeightsError, match=r"nope.*no such file"):
        kwjax.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(WeightsError, match=r"neither config\.json"):
        kwjax.load(tmp_path)


def test_missing_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no model\.safetensors"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_pytorch_bin_only_is_named(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*safetensors only"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_truncated_safetensors(tiny_dir):
    path = tiny_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_garbage_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: header length"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_invalid_config_json(tiny_dir):
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_other_architecture(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"config\.json: model_type is 'llama'"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_config_with_more_layers_than_weights(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    cfg["layer_types"].append("sliding_attention")
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model\.layers\.4\..* is missing"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_config_with_fewer_layers_than_weights(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    cfg["layer_types"].pop()
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"not in a Gemma 3 model.*model\.layers\.3\."):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_config_shape_disagrees_with_weights(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                           r"has shape \(128, 64\) but config\.json implies \(256, 64\)"):
        kwjax.load(tiny_dir, with_tokenizer=False)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(WeightsError, match=r"model\.gguf: not a GGUF file"):
        kwjax.load(bad)


def test_gguf_of_another_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match=r"llama\.gguf: GGUF architecture is 'llama'"):
        kwjax.load(path)


@pytest.mark.real_weights
def test_truncated_gguf(gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with gguf_path.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(40 * 2**20))
    with pytest.raises(WeightsError, match=r"cut\.gguf: (truncated|cannot parse)"):
        kwjax.load(cut)


def test_unknown_dtype(tiny_dir):
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'"):
        kwjax.load(tiny_dir, dtype="float8", with_tokenizer=False)


def test_native_checkpoint_of_another_size(tmp_path):
    small = cfglib.tiny()
    params = kwjax.models.gemma3.model.init_params(small, jax.random.PRNGKey(0))
    kwjax.weights.save_native(kwjax.LoadedModel(small, params, None, "x"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"m/params: cannot restore parameters"):
        kwjax.load(tmp_path / "m", with_tokenizer=False)


def test_incomplete_native_directory_is_not_mistaken(tmp_path):
    small = cfglib.tiny()
    params = kwjax.models.gemma3.model.init_params(small, jax.random.PRNGKey(0))
    kwjax.weights.save_native(kwjax.LoadedModel(small, params, None, "x"), tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "params")
    with pytest.raises(WeightsError, match=r"m: no 'params' checkpoint folder"):
        kwjax.load(tmp_path / "m", with_tokenizer=False)


@pytest.mark.real_weights
def test_vocabulary_larger_than_embedding(tiny_dir, gguf_path):
    from kwjax.tokenizer import load_tokenizer

    load_tokenizer(gguf_path).save(tiny_dir)  # 262,144 tokens beside a 512-row embedding
    with pytest.raises(WeightsError, match=r"ckpt: the tokenizer has 262144 tokens but the model's embedding "
                                           r"has only 512 rows"):
        kwjax.load(tiny_dir)
