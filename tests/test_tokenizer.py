"""kwjax.tokenizer against transformers, from each source (GGUF, tokenizer.model, tokenizer.json).

Expensive objects (transformers' GGUF tokenizer takes ~15 s to build) are module-scoped and shared.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import time
from pathlib import Path

import pytest

import kwjax.tokenizer as tk
from kwjax.models.gemma3.chat import encode_chat, format_user_prompt
from kwjax.tokenizer import TokenizerError, load_tokenizer

TEXTS = [
    "나는 어제 친구와 함께 도서관에 갔다. 책을 읽고, 커피를 마셨으며, 저녁에는 집으로 돌아왔다.",
    "선생님께서는 학생들에게 숙제를 내 주셨고, 우리는 그것을 내일까지 끝내야 한다.",
    "The quick brown fox jumps over the lazy dog. It's 'quoted' and \"double-quoted\".",
    "Mixed 한국어 and English: 오늘의 weather는 sunny입니다!",
    "Digits: 0 7 42 2024년 3월 15일, 3.14159, 1,000,000원, 010-1234-5678, x^2+y^2=z^2",
    "Emoji 😀👍🏽❤️🇰🇷 좋아요~ ㅋㅋㅋㅋ ㅎㅎ ^^;",
    "multiple  spaces   here    and\ttabs\t\tand  a  run:" + " " * 40 + "end",
    " " * 33 + "indented code" + " " * 31 + "x",
    "first line\nsecond line\n\n\nfourth\r\nwindows line\n",
    " leading space",
    "   three leading spaces and trailing ",
    "<start_of_turn>user\n시를 한 편 써 주세요.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\nOld pond<end_of_turn>\n",
    "<bos>text between<eos> <pad><unk><mask> <unused0><unused98>",
    "not special: <start_of_turn <end_of_turn>> <<bos>> <start_of_turn>",
    "<table><tr><td>셀</td></tr></table> [multimodal] <start_of_image>",
    "literal meta ▁ symbol ▁▁ twice",
    "rare: 𠜎𠜱 ㈜ ﷽ \u200b zero-width \u3000 ideographic space é é",
    "",
]

PAIRS = [
    ("시를 한 편 써 주세요.", "봄비가 내리는 골목에서\n우산을 접는다."),
    ("  Explain BPE briefly.  \n", "\n  BPE merges frequent pairs of symbols.  \n"),
    ("숫자 123", "456! 😀"),
    ("질문은?", " 답은 '네'입니다"),
    ("", ""),
    ("<end_of_turn> inside a prompt", "and **markdown**\n\n- item"),
]


SPECIAL_TEXT = re.compile(r"<(?:bos|eos|pad|unk|mask|unused\d+|start_of_turn|end_of_turn)>")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A private KWJAX_CACHE so the test sees a cold conversion and leaves the user's cache alone."""
    root = tmp_path_factory.mktemp("kwjax_cache")
    old = os.environ.get("KWJAX_CACHE")
    os.environ["KWJAX_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("KWJAX_CACHE", None)
    else:
        os.environ["KWJAX_CACHE"] = old


@pytest.fixture(scope="module")
def timings():
    return {}


@pytest.fixture(scope="module")
def ours_gguf(gguf_path, cache_root, timings):
    start = time.perf_counter()
    tok = load_tokenizer(gguf_path)
    timings["cold"] = time.perf_counter() - start
    return tok


@pytest.fixture(scope="module")
def hf_gguf(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def json_dir(hf_gguf, tmp_path_factory):
    """tokenizer.json written by transformers' own fast tokenizer (built from the GGUF)."""
    directory = tmp_path_factory.mktemp("hf_json")
    hf_gguf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ours_json(json_dir):
    return load_tokenizer(json_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_json(json_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(json_dir))


@pytest.fixture(scope="module")
def model_dir(ours_gguf, tmp_path_factory):
    """Our save(): tokenizer.model (our conversion) + tokenizer_config.json + special_tokens_map.json."""
    return ours_gguf.save(tmp_path_factory.mktemp("ours_model"))


@pytest.fixture(scope="module")
def ours_model(model_dir):
    return load_tokenizer(model_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    """transformers' AutoTokenizer on our directory (GemmaTokenizer converting our tokenizer.model)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _pairs(request, names):
    return [(request.getfixturevalue(o), request.getfixturevalue(h)) for o, h in names]


SOURCES = {"gguf": ("ours_gguf", "hf_gguf"), "tokenizer.model": ("ours_model", "hf_model"),
           "tokenizer.json": ("ours_json", "hf_json")}


# ------------------------------------------------------------------------------------------------
# Parity with transformers, per source.


@pytest.mark.real_weights
@pytest.mark.parametrize("source", list(SOURCES))
def test_ids_equal_transformers(source, request):
    ours, hf = _pairs(request, [SOURCES[source]])[0]
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_bos=True) == hf.encode(text), text


@pytest.mark.real_weights
@pytest.mark.parametrize("source", list(SOURCES))
def test_decode_round_trip_and_equals_transformers(source, request):
    ours, hf = _pairs(request, [SOURCES[source]])[0]
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True)
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True), text
        # "▁" typed in the text is SentencePiece's space symbol, so it comes back as a space.
        plain = text.replace("\u2581", " ")
        assert ours.decode(ours.encode(text)) == plain, text
        assert ours.decode(ids, skip_special=True) == SPECIAL_TEXT.sub("", plain), text


def _random_text(rng: random.Random, pieces: list[str]) -> str:
    bits = [" ", "  ", " " * rng.randint(3, 80), "\n", "\n\n", "\t", "▁", "<start_of_turn>",
            "<end_of_turn>", "<unused7>", "<td>", "😀", "가", "은", "는", "1", "2024", "!", "..."]
    out = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        if r < 0.45:
            out.append(rng.choice(pieces).replace("\u2581", " "))
        elif r < 0.75:
            out.append(rng.choice(bits))
        elif r < 0.9:
            out.append("".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(rng.randint(1, 4))))
        else:
            out.append(chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1FAFF),
                                       rng.randint(0x20000, 0x2A6DF)])))
    return "".join(out)


@pytest.mark.real_weights
def test_random_texts_equal_transformers(ours_gguf, hf_gguf):
    """Vocabulary pieces, Hangul, rare characters (byte fallback) and long whitespace runs, shuffled."""
    rng = random.Random(1234)
    pieces = [ours_gguf.id_to_piece(rng.randrange(500, ours_gguf.vocab_size - 7000)) for _ in range(3000)]
    for _ in range(1500):
        text = _random_text(rng, pieces)
        assert ours_gguf.encode(text) == hf_gguf.encode(text, add_special_tokens=False), repr(text)


@pytest.mark.real_weights
def test_sources_agree(ours_gguf, ours_model, ours_json):
    for text in TEXTS:
        assert ours_gguf.encode(text) == ours_model.encode(text) == ours_json.encode(text), text


@pytest.mark.real_weights
@pytest.mark.parametrize("name", ["ours_gguf", "ours_model", "ours_json"])
def test_special_ids_from_vocabulary(name, request):
    tok = request.getfixturevalue(name)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.vocab_size == 262144
    assert tok.id_to_piece(106) == "<end_of_turn>" and tok.piece_to_id("<end_of_turn>") == 106
    assert tok.encode("<end_of_turn>") == [106]
    assert {0, 1, 2, 3, 105, 106} <= tok.special_ids and 107 not in tok.special_ids  # "\n" is not special
    with pytest.raises(KeyError):
        tok.piece_to_id("no such piece at all")
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


# ------------------------------------------------------------------------------------------------
# Chat format.


def _template_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


@pytest.mark.real_weights
@pytest.mark.parametrize("name", ["ours_gguf", "ours_json"])
def test_encode_chat_equals_apply_chat_template(name, request, hf_model):
    tok = request.getfixturevalue(name)
    for prompt, response in PAIRS:
        ids, mask = encode_chat(tok, prompt, response)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        assert ids == _template_ids(hf_model, messages), (prompt, response)
        assert len(mask) == len(ids)
        # the loss covers the response and its <end_of_turn>, not the prompt or the trailing "\n"
        answer = [i for i, m in zip(ids, mask) if m]
        assert answer == tok.encode(response.strip()) + [tok.end_of_turn_id]
        assert ids[-2:] == [tok.end_of_turn_id, tok.encode("\n")[0]] and mask[-2:] == [1, 0]
        assert mask == sorted(mask[:-1]) + [0]  # one contiguous span

        gen_ids, gen_mask = encode_chat(tok, prompt)
        assert gen_ids == _template_ids(hf_model, messages[:1], add_generation_prompt=True)
        assert not any(gen_mask) and ids[:len(gen_ids)] == gen_ids


@pytest.mark.real_weights
def test_encode_chat_has_no_merge_across_boundaries(ours_gguf):
    """Encoding the parts separately gives the ids of the whole formatted string."""
    tok = ours_gguf
    for prompt, response in PAIRS + [(t, t) for t in TEXTS if t.strip()]:
        ids, _ = encode_chat(tok, prompt, response)
        whole = format_user_prompt(prompt) + response.strip() + "<end_of_turn>\n"
        assert ids == tok.encode(whole, add_bos=True), (prompt, response)


def test_format_user_prompt_matches_template():
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tk.GEMMA3_CHAT_TEMPLATE)
    for prompt in ["안녕하세요", "  padded prompt \n", "two\nlines"]:
        rendered = template.render(messages=[{"role": "user", "content": prompt}],
                                   bos_token="<bos>", add_generation_prompt=True)
        assert rendered == "<bos>" + format_user_prompt(prompt)
    assert format_user_prompt("hi") == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


# ------------------------------------------------------------------------------------------------
# save() and loading what it wrote.


@pytest.mark.real_weights
def test_saved_model_dir_loads_in_transformers(model_dir, hf_model, ours_gguf):
    assert {p.name for p in model_dir.iterdir()} >= {"tokenizer.model", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tk.GEMMA3_CHAT_TEMPLATE
    assert (hf_model.bos_token, hf_model.eos_token, hf_model.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert len(hf_model) == ours_gguf.vocab_size
    assert load_tokenizer(model_dir).encode(TEXTS[0]) == ours_gguf.encode(TEXTS[0])


@pytest.mark.real_weights
def test_saved_json_dir_loads_in_transformers(ours_json, hf_json, tmp_path):
    import transformers

    ours_json.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.model").exists()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert hf.encode(text) == ours_json.encode(text, add_bos=True), text
    messages = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요!"}]
    assert _template_ids(hf, messages) == encode_chat(ours_json, "안녕?", "안녕하세요!")[0]


# ------------------------------------------------------------------------------------------------
# GGUF conversion cache.


@pytest.mark.real_weights
def test_gguf_conversion_is_cached(gguf_path, ours_gguf, cache_root, timings, monkeypatch):
    entry = tk.gguf_cache_entry(gguf_path)
    assert entry.is_relative_to(cache_root)
    model_file = entry / "tokenizer.model"
    mtime = model_file.stat().st_mtime_ns
    calls = []
    real = tk.gguf_to_sentencepiece
    monkeypatch.setattr(tk, "gguf_to_sentencepiece", lambda p: calls.append(p) or real(p))

    start = time.perf_counter()
    again = load_tokenizer(gguf_path)
    timings["cached"] = time.perf_counter() - start
    assert calls == [] and model_file.stat().st_mtime_ns == mtime
    assert again.encode(TEXTS[0]) == ours_gguf.encode(TEXTS[0])
    print(f"\nGGUF tokenizer load: cold {timings['cold']:.2f} s, cached {timings['cached']:.2f} s")

    model_file.write_bytes(b"damaged")  # a damaged entry is rebuilt, not trusted
    assert load_tokenizer(gguf_path).encode(TEXTS[0]) == ours_gguf.encode(TEXTS[0])
    assert len(calls) == 1 and model_file.stat().st_size > 1_000_000


# ------------------------------------------------------------------------------------------------
# Errors (small synthetic files: no real weights needed).


def _gguf_bytes(kv: dict, version: int = 3) -> bytes:
    """A GGUF with metadata only (no tensors): strings, ints, bools, float32/int32/string arrays."""
    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    def value(v) -> bytes:
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, int):
            return struct.pack("<Ii", 5, v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        kind, items = v
        if kind == "str":
            return struct.pack("<IIQ", 9, 8, len(items)) + b"".join(string(s) for s in items)
        code, vtype = {"f32": ("f", 6), "i32": ("i", 5)}[kind]
        return struct.pack("<IIQ", 9, vtype, len(items)) + struct.pack(f"<{len(items)}{code}", *items)

    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(kv))
    for key, v in kv.items():
        out += string(key) + value(v)
    return out


def _mini_gemma_vocab(with_turns: bool = True) -> dict:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    types = [3] * 5
    if with_turns:
        tokens += ["<start_of_turn>", "<end_of_turn>"]
        types += [3, 3]
    tokens += ["\n", "\n\n", "  ", "   "]
    types += [4, 4, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["▁", "a", "b", "u", "s", "e", "r", "m", "o", "d", "l", "▁a", "ab", "us", "er", "user",
              "mo", "de", "el", "model", "▁ab"]
    tokens += normal
    types += [1] * len(normal)
    scores = [-1000.0 if t in (3, 4) else 0.0 for t in types]
    first = len(tokens) - len(normal)
    scores[first:] = [-float(i) for i in range(len(normal))]
    return {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": ("str", tokens), "tokenizer.ggml.scores": ("f32", scores),
            "tokenizer.ggml.token_type": ("i32", types), "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_space_prefix": False}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KWJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mini_gguf_converts_and_caches(tmp_path, private_cache, monkeypatch):
    path = tmp_path / "mini.gguf"
    path.write_bytes(_gguf_bytes(_mini_gemma_vocab()))
    tok = load_tokenizer(path)
    ids = tok.encode("<start_of_turn>user\nab  ab<end_of_turn>\n")
    assert [tok.id_to_piece(i) for i in ids] == ["<start_of_turn>", "user", "\n", "ab", "▁▁", "ab",
                                                  "<end_of_turn>", "\n"]
    assert tok.decode(ids) == "<start_of_turn>user\nab  ab<end_of_turn>\n"
    assert tok.encode("é") == [tok.piece_to_id("<0xC3>"), tok.piece_to_id("<0xA9>")]  # byte fallback

    calls = []
    real = tk.gguf_to_sentencepiece
    monkeypatch.setattr(tk, "gguf_to_sentencepiece", lambda p: calls.append(p) or real(p))
    load_tokenizer(path)
    assert calls == []
    path.write_bytes(_gguf_bytes(_mini_gemma_vocab()))  # a new mtime is a new key
    os.utime(path, ns=(1, 1))
    load_tokenizer(path)
    assert len(calls) == 1


def _assert_error(path: Path, *words: str) -> None:
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    message = str(err.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def test_missing_file_and_empty_directory(tmp_path):
    _assert_error(tmp_path / "nope" / "tokenizer.json", "no such file")
    _assert_error(tmp_path, "neither tokenizer.json nor tokenizer.model")


def test_corrupt_files(tmp_path, private_cache):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 certainly not a protobuf" * 10)
    _assert_error(tmp_path / "tokenizer.model", "SentencePiece")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    _assert_error(tmp_path / "tokenizer.json", "tokenizer.json")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(100))
    _assert_error(tmp_path / "bad.gguf", "not a GGUF")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    _assert_error(tmp_path / "tiny.gguf", "truncated")
    full = _gguf_bytes(_mini_gemma_vocab())
    (tmp_path / "cut.gguf").write_bytes(full[: len(full) // 2])
    _assert_error(tmp_path / "cut.gguf", "truncated")


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    path.chmod(0)
    _assert_error(path, "cannot read")


def test_gguf_without_vocabulary_or_not_gemma(tmp_path, private_cache):
    path = tmp_path / "novocab.gguf"
    path.write_bytes(_gguf_bytes({"general.architecture": "gemma3", "general.name": "weights only"}))
    _assert_error(path, "no tokenizer vocabulary")

    gpt2 = dict(_mini_gemma_vocab(), **{"tokenizer.ggml.model": "gpt2", "general.architecture": "qwen2"})
    path = tmp_path / "qwen.gguf"
    path.write_bytes(_gguf_bytes(gpt2))
    _assert_error(path, "not a Gemma")

    llama = dict(_mini_gemma_vocab(), **{"general.architecture": "llama"})
    path = tmp_path / "llama.gguf"
    path.write_bytes(_gguf_bytes(llama))
    _assert_error(path, "not a Gemma")


def test_vocabulary_without_turn_tokens(tmp_path, private_cache):
    path = tmp_path / "noturns.gguf"
    path.write_bytes(_gguf_bytes(_mini_gemma_vocab(with_turns=False)))
    _assert_error(path, "<start_of_turn>")
    assert not list((private_cache / "tokenizers").glob("*/tokenizer.model"))  # nothing cached

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4}
    HFTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    _assert_error(tmp_path / "tokenizer.json", "<start_of_turn>")


def test_literal_splitter_is_leftmost_longest():
    rx = tk._literal_splitter(["<a>", "<ab>", "<abc>", "<b>"])
    assert rx.split("x<abc><ab>y<a><b><abd>") == ["x", "<abc>", "", "<ab>", "y", "<a>", "", "<b>", "<abd>"]
    assert tk._literal_splitter([]) is None
