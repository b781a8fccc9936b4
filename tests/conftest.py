"""Shared fixtures. Real-weights fixtures are session-scoped: loading Gemma 3 270M costs seconds."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Scripts run by tests keep no compiled programs in the user's cache; tests of the disk cache set a path.
os.environ.setdefault("KWJAX_XLA_CACHE", "0")

import numpy as np
import pytest

# Korean and English prose used by the real-weights parity tests (written for kwjax).
KOREAN = (
    "비가 그친 골목에는 물웅덩이마다 하늘이 한 조각씩 내려와 있었다. 할머니는 우산을 접으며 "
    "오늘 저녁에는 호박죽을 끓이자고 말했다. 나는 젖은 운동화를 벗어 현관에 세워 두고, 창문 너머로 "
    "천천히 번지는 노을을 바라보았다."
)
ENGLISH = (
    "The lighthouse keeper wrote one letter every winter, addressed to nobody in particular. "
    "He described the colour of the sea at dawn, the sound of gulls arguing over the harbour, "
    "and the small, stubborn lamp that never once went out."
)


def random_logps_inputs(rng: np.random.Generator, B: int, T: int, D: int, V: int, R: int, emb_scale: float):
    """Random inputs of `losses.response_logps`: hidden [B, T, D], embedding [V, D], response positions
    and targets [B, R], and an all-true mask for the caller to punch holes in."""
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    emb = (emb_scale * rng.normal(size=(V, D))).astype(np.float32)
    idx = rng.integers(0, T, size=(B, R)).astype(np.int32)
    tgt = rng.integers(0, V, size=(B, R)).astype(np.int32)
    return hidden, emb, idx, tgt, np.ones((B, R), bool)


def compiled_flops(compiled) -> float:
    """XLA's own FLOP count of a compiled program (`cost_analysis()` is a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def tiny_config(**overrides):
    """configs/tiny.py (a random 3-layer model, the real tokenizer) with dotted-key overrides, checkpoints
    every 100 steps (i.e. at the end of these short runs)."""
    import runpy
    from pathlib import Path

    cfg = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))["get_config"]()
    cfg.checkpoint_every = 100
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def assert_refused_before_any_work(overrides: dict, message: str, workdir) -> None:
    """Training a tiny model with these settings stops with a TrainingError matching `message` (a regex)
    before anything is written: a bad setting costs the user no work and no checkpoint."""
    from kwjax import stages
    from kwjax import train as T

    cfg = tiny_config(**overrides)
    with pytest.raises(T.TrainingError, match=message):
        T.train(cfg, "sft", workdir, stages.load_model(cfg), progress=False)
    assert not (workdir / "checkpoints").exists()


def long_text() -> str:
    """A mixed Korean/English text well over 512 tokens, so sliding-window layers are exercised."""
    return "\n\n".join([KOREAN, ENGLISH] * 8)


@pytest.fixture(scope="session")
def gguf_path():
    from kwjax.paths import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def real_model():
    import kwjax

    return kwjax.load("gemma3-270m", dtype="float32")


@pytest.fixture(scope="session")
def hf_reference(gguf_path):
    """transformers' own Gemma3ForCausalLM, dequantizing the same GGUF by its own code."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    return model


def hf_logits(model, tokens_BT: np.ndarray, mask_BT: np.ndarray | None = None) -> np.ndarray:
    """Reference logits with explicit position ids (HF does not derive them from the mask in forward)."""
    import torch

    tokens_BT = np.asarray(tokens_BT)
    if mask_BT is None:
        mask_BT = np.ones_like(tokens_BT)
    positions = np.maximum(np.cumsum(mask_BT, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens_BT), attention_mask=torch.tensor(mask_BT),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()
