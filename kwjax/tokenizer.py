"""The Gemma 3 tokenizer behind one interface, from tokenizer.json, tokenizer.model or a GGUF vocabulary.

Ids must equal what transformers produces for the same files, because a model exported from kwjax is
used with transformers' tokenizer, and training on different ids than inference sees is silent damage.

A GGUF carries no tokenizer file, only the vocabulary (pieces, scores, types). It is converted once into
a SentencePiece `tokenizer.model` and cached under `cache_dir()/tokenizers/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from kwjax.files import atomic_write_text
from kwjax.models.gemma3.chat import END_OF_TURN, GEMMA3_CHAT_TEMPLATE, START_OF_TURN
from kwjax.paths import cache_dir

log = logging.getLogger(__name__)

# Bump when the GGUF conversion changes, so caches written by older code are not reused.
_CONVERTER_VERSION = 1
_GEMMA_SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


class TokenizerError(ValueError):
    """A tokenizer source that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------
# Backends: the library that runs a given file. Both resolve special-token strings written in the text.


class _Backend(Protocol):
    special_ids: frozenset[int]

    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def id_to_piece(self, token_id: int) -> str | None: ...
    def write(self, directory: Path) -> str: ...


class _SentencePieceBackend:
    """`sentencepiece` on a tokenizer.model. It never reads control pieces from text, so we split them out."""

    def __init__(self, model_proto: bytes, path: Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        try:
            proto = pb.ModelProto.FromString(model_proto)
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # protobuf DecodeError, RuntimeError from the C++ loader
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({_first_line(e)})") from None
        self._proto_bytes = model_proto
        # transformers treats control and unknown pieces as special tokens, matched whole in the text.
        special = {
            i: p.piece for i, p in enumerate(proto.pieces)
            if p.type in (pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.UNKNOWN)
        }
        self.special_ids = frozenset(special)
        self._special_by_text = {text: i for i, text in special.items()}
        self._splitter = _literal_splitter(special.values())

    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._split(text)):
            if i % 2:
                ids.append(self._special_by_text[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def _split(self, text: str) -> list[str]:
        """Alternating [text, special, text, ...]; `re.split` with one capture group gives exactly that."""
        return self._splitter.split(text) if self._splitter else [text]

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        # sentencepiece renders control pieces as "" and <unk> as " ⁇ "; transformers writes their text.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                out.append(self._sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None  # unknown pieces map to <unk>

    def id_to_piece(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None

    def write(self, directory: Path) -> str:
        (directory / "tokenizer.model").write_bytes(self._proto_bytes)
        return "tokenizer.model"


class _TokenizersBackend:
    """The `tokenizers` library on a tokenizer.json: it already matches added tokens in the text."""

    def __init__(self, json_text: str, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(json_text)
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
        self._json = json_text
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)

    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def id_to_piece(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if token_id >= 0 else None

    def write(self, directory: Path) -> str:
        atomic_write_text(directory / "tokenizer.json", self._json)
        return "tokenizer.json"


def _literal_splitter(literals: Iterable[str]) -> re.Pattern | None:
    """A regex with one group matching any literal, leftmost-longest; a trie, so 6k literals stay fast."""
    trie: dict = {}
    for text in literals:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}
    if not trie:
        return None
    return re.compile(f"({_trie_regex(trie)})")


def _trie_regex(node: dict) -> str:
    ends_here = "" in node
    branches = [re.escape(ch) + _trie_regex(child) for ch, child in sorted(node.items()) if ch]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 and not ends_here else f"(?:{'|'.join(branches)})"
    return f"(?:{body})?" if ends_here else body  # greedy `?` tries the longer literal first


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------------
# The public tokenizer.


class Tokenizer:
    """Gemma 3 tokenizer: encode/decode with special tokens resolved the way transformers does."""

    def __init__(self, backend: _Backend, source: Path):
        self._backend = backend
        self.source = source
        self.special_ids = backend.special_ids
        self.pad_id = self._required_id(_GEMMA_SPECIALS["pad"])
        self.bos_id = self._required_id(_GEMMA_SPECIALS["bos"])
        self.eos_id = self._required_id(_GEMMA_SPECIALS["eos"])
        self.unk_id = self._required_id(_GEMMA_SPECIALS["unk"])
        self.start_of_turn_id = self._required_id(START_OF_TURN)
        self.end_of_turn_id = self._required_id(END_OF_TURN)

    def _required_id(self, piece: str) -> int:
        token_id = self._backend.piece_to_id(piece)
        if token_id is None:
            raise TokenizerError(f"{self.source}: the vocabulary has no {piece} token; "
                                 "not a Gemma (instruction-format) tokenizer")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer(source={str(self.source)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings written in it (e.g. "<end_of_turn>") become one id."""
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; with `skip_special`, control tokens (<bos>, <end_of_turn>, ...) are dropped."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids out of range [0, {size}): {bad[:5]}")
        return self._backend.decode(ids, skip_special)

    def piece_to_id(self, piece: str) -> int:
        token_id = self._backend.piece_to_id(piece)
        if token_id is None:
            raise KeyError(piece)
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        piece = self._backend.id_to_piece(int(token_id))
        if piece is None:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return piece

    def save(self, directory: str | Path) -> Path:
        """Writes files `transformers.AutoTokenizer.from_pretrained(directory)` loads as this tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = self._backend.write(directory)
        # transformers prefers tokenizer.json: a stale one next to a new tokenizer.model would win.
        for other in ("tokenizer.json", "tokenizer.model"):
            if other != written and (directory / other).exists():
                log.warning("removing %s: %s now describes the tokenizer", directory / other, written)
                (directory / other).unlink()
        specials = self._special_tokens_map()
        config = {
            "tokenizer_class": "GemmaTokenizer",
            **specials,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "chat_template": GEMMA3_CHAT_TEMPLATE,
        }
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json", specials)
        return directory

    def _special_tokens_map(self) -> dict[str, str]:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
                 "pad_token": self.pad_id}
        specials = {name: self.id_to_piece(i) for name, i in names.items()}
        if self._backend.piece_to_id("<mask>") is not None:
            specials["mask_token"] = "<mask>"
        return specials


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Loading.


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """A tokenizer from tokenizer.json, tokenizer.model, a directory with one (json first) or a .gguf."""
    path = Path(source).expanduser()
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_dir(path)
    kind = _file_kind(path)
    loader = {"json": _load_json, "sentencepiece": _load_sentencepiece, "gguf": _load_gguf}[kind]
    return loader(path)


def _load_dir(path: Path) -> Tokenizer:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return load_tokenizer(path / name)
    raise TokenizerError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")


def _file_kind(path: Path) -> str:
    """By suffix, else by content: GGUF magic, a JSON object, else try SentencePiece."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".gguf"):
        return suffix[1:]
    if suffix == ".model":
        return "sentencepiece"
    head = _read_bytes(path, limit=4)
    if head == b"GGUF":
        return "gguf"
    return "json" if head.lstrip()[:1] == b"{" else "sentencepiece"


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None


def _load_json(path: Path) -> Tokenizer:
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: not a valid tokenizer.json (not UTF-8 text)") from None
    return Tokenizer(_TokenizersBackend(text, path), path)


def _load_sentencepiece(path: Path, source: Path | None = None) -> Tokenizer:
    return Tokenizer(_SentencePieceBackend(_read_bytes(path), path), source or path)


# ---------------------------------------------------------------------------------------------------
# GGUF: read the vocabulary, convert it to a SentencePiece model once, cache it.


def _load_gguf(path: Path) -> Tokenizer:
    entry = gguf_cache_entry(path)
    cached = entry / "tokenizer.model"
    if cached.is_file():
        try:
            return _load_sentencepiece(cached, source=path)
        except TokenizerError as e:
            log.warning("rebuilding damaged tokenizer cache %s: %s", entry, e)
    start = time.perf_counter()
    proto = gguf_to_sentencepiece(path)
    seconds = time.perf_counter() - start
    tokenizer = Tokenizer(_SentencePieceBackend(proto, path), path)  # validate before caching
    _store_cache(entry, proto, {"gguf": str(path.resolve()), "converter_version": _CONVERTER_VERSION,
                                "conversion_seconds": round(seconds, 3)})
    return tokenizer


def gguf_cache_entry(path: Path) -> Path:
    """The cache directory of this GGUF's converted tokenizer, keyed by name, size, mtime and converter."""
    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).name}|{st.st_size}|{st.st_mtime_ns}|{_CONVERTER_VERSION}".encode())
    return cache_dir() / "tokenizers" / f"{Path(path).stem}-{key.hexdigest()[:16]}"


def _store_cache(entry: Path, proto: bytes, info: dict) -> None:
    """Writes into a temporary sibling then renames, so a reader never sees a half-written entry."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        (tmp / "tokenizer.model").write_bytes(proto)
        _write_json(tmp / "source.json", info)
        if entry.exists():  # a damaged entry (a sound one would have loaded)
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("could not cache the converted tokenizer in %s: %s", entry, e)


def gguf_to_sentencepiece(path: Path) -> bytes:
    """A serialized SentencePiece BPE ModelProto built from a Gemma GGUF's vocabulary.

    Pieces, scores and types come from the GGUF (its token types use SentencePiece's enum), with
    byte fallback, an identity normalizer, no dummy prefix and no whitespace collapsing. Two changes:
    - <unk> gets type UNKNOWN (SentencePiece requires one; llama.cpp files mark it CONTROL).
    - The whitespace-run pieces ("  " ... 31 spaces; the file spells them with real spaces) become
      "▁▁"... NORMAL pieces ranked above all others, shortest first. As USER_DEFINED pieces,
      SentencePiece (and llama.cpp) would cut a run of 32+ spaces as 31 + rest; transformers merges
      such runs with BPE in file order (e.g. 16 + 16 + 8 for 40). We match transformers; runs of
      up to 31 spaces give one piece either way.
    """
    meta = read_gguf_metadata(path)
    tokens, scores, types = _gguf_vocabulary(meta, path)
    return _build_model_proto(tokens, scores, types, meta, path)


def _gguf_vocabulary(meta: dict[str, Any], path: Path) -> tuple[list[str], list[float], list[int]]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{path}: the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    model = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture", ""))
    if model != "llama" or not arch.startswith("gemma"):
        raise TokenizerError(f"{path}: GGUF tokenizer {model!r} of architecture {arch!r} is not a Gemma "
                             "SentencePiece vocabulary (need tokenizer.ggml.model 'llama', a gemma arch)")
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    scores = scores.tolist() if hasattr(scores, "tolist") else scores
    types = types.tolist() if hasattr(types, "tolist") else types
    for name, values in (("scores", scores), ("token_type", types)):
        if not isinstance(values, list) or len(values) != len(tokens):
            raise TokenizerError(f"{path}: tokenizer.ggml.{name} is missing or does not have one entry "
                                 f"per token ({len(tokens)})")
    return tokens, scores, types


def _build_model_proto(tokens: list[str], scores: list[float], types: list[int], meta: dict[str, Any],
                       path: Path) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece_type = pb.ModelProto.SentencePiece
    if "<unk>" not in tokens:
        raise TokenizerError(f"{path}: the GGUF vocabulary has no <unk> token")
    unk = tokens.index("<unk>")
    is_space_run = [t == piece_type.USER_DEFINED and len(s) > 1 and set(s) <= {" ", "\u2581"}
                    for s, t in zip(tokens, types)]
    top = max((s for s, t in zip(scores, types) if t == piece_type.NORMAL), default=0.0)
    rank = iter(range(sum(is_space_run), 0, -1))

    proto = pb.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind not in piece_type.Type.values():
            raise TokenizerError(f"{path}: token {i} ({token!r}) has unknown type {kind}")
        if is_space_run[i]:
            token, score, kind = "\u2581" * len(token), top + next(rank), piece_type.NORMAL
        elif i == unk:
            kind = piece_type.UNKNOWN
        elif kind == piece_type.UNKNOWN:
            kind = piece_type.CONTROL
        proto.pieces.add(piece=token, score=float(score), type=kind)

    _fill_specs(proto, tokens, meta)
    return proto.SerializeToString()


def _fill_specs(proto: Any, tokens: list[str], meta: dict[str, Any]) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    for name, piece in _GEMMA_SPECIALS.items():
        setattr(spec, f"{name}_piece", piece)
        setattr(spec, f"{name}_id", tokens.index(piece) if piece in tokens else -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """All metadata key/values of a GGUF (v2/v3), without touching tensor data."""
    from kwjax.gguf_file import GGUFFormatError, read_metadata

    try:
        return read_metadata(path)
    except GGUFFormatError as e:
        raise TokenizerError(str(e)) from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
