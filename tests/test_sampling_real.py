"""Greedy generation on the real Gemma 3 270M equals transformers' generate, token for token."""

from __future__ import annotations

import numpy as np
import pytest

from kwjax.sampling import Sampler, SamplingConfig
from kwjax.models.gemma3.chat import format_user_prompt
from tests.conftest import long_text

pytestmark = pytest.mark.real_weights

TEXT_PROMPTS = [
    format_user_prompt("'등대', '소금', '약속'이 들어간 시를 한 편 써 주세요."),
    format_user_prompt("Write two sentences about a lighthouse keeper."),
    "서울의 겨울은",
    "The three primary colours are",
    format_user_prompt("바다"),
    "옛날 옛적에 작은 마을에",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def prompts(real_model):
    tok = real_model.tokenizer
    ids = [tok.encode(p, add_bos=True) for p in TEXT_PROMPTS]
    crossing = tok.encode(long_text(), add_bos=True)[:500]  # decoding runs past the 512 window
    return ids + [crossing]


def hf_greedy(model, ids, max_new_tokens, stop_ids):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    logits = torch.stack(out.logits, dim=1)[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return new, [float(logp[i, t]) for i, t in enumerate(new)]


def test_greedy_equals_transformers_generate(real_model, hf_reference, prompts):
    assert len(prompts) >= 8 and len(set(map(len, prompts))) >= 6
    sampler = Sampler(real_model, batch_size=8)
    ours = sampler.generate(prompts, SamplingConfig(max_new_tokens=32, greedy=True))
    for i, (ids, sample) in enumerate(zip(prompts, ours)):
        ref_tokens, ref_logp = hf_greedy(hf_reference, ids, 32, sampler.stop_ids)
        assert sample.tokens == ref_tokens, f"prompt {i}: {sample.tokens} != {ref_tokens}"
        np.testing.assert_allclose(sample.logprobs, ref_logp, atol=1e-3, rtol=0)
        ended = bool(ref_tokens) and ref_tokens[-1] in sampler.stop_ids
        assert sample.stop_reason == ("stop_token" if ended else "max_new_tokens")
    assert len(prompts[-1]) + len(ours[-1].tokens) > real_model.config.sliding_window


def test_chat_mode_wraps_prompt(real_model):
    sampler = Sampler(real_model, batch_size=2)
    cfg = SamplingConfig(max_new_tokens=8, greedy=True)
    wrapped = sampler.generate(["바다에 대한 시를 써 줘."], cfg, chat=True)[0]
    explicit = sampler.generate([format_user_prompt("바다에 대한 시를 써 줘.")], cfg)[0]
    assert wrapped.tokens == explicit.tokens
