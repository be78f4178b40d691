"""`Tokenizer`: the one tokenizer object the rest of slmforge uses, and its folder on disk.

A tokenizer folder loads with `transformers.AutoTokenizer.from_pretrained` and with us:

    tok/
      tokenizer.json           # the `tokenizers` pipeline (normalizer, pre-tokenizer, model, decoder)
      tokenizer_config.json    # HF: tokenizer_class, bos/eos/pad/unk/mask, additional_special_tokens
      special_tokens_map.json  # HF: the same special tokens
      slmforge_tokenizer.json  # ours: kind, special-token roles, sha256 of tokenizer.json,
                               # the training config and sample record (or where it was imported from)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors
from tokenizers.decoders import DecodeStream

from slmforge.errors import SlmforgeError
from slmforge.fileio import read_json, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "slmforge-tokenizer/1"
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_FILE = "special_tokens_map.json"
META_FILE = "slmforge_tokenizer.json"
STABLE_ROUNDS = 4  # JSON round trips allowed to reach tokenizer.json's stable form
ROLES = ("bos", "eos", "pad", "unk", "mask")
SENTINEL = re.compile(r"<extra_id_(\d+)>")
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Role names used by other tokenizers, for folders that carry no slmforge metadata.
ROLE_GUESSES = {
    "bos": ["<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>"],
    "eos": ["<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"],
    "pad": ["<pad>", "[PAD]", "<|pad|>"],
    "unk": ["<unk>", "[UNK]", "<|unk|>"],
    "mask": ["<mask>", "[MASK]", "<|mask|>"],
}


class StreamDecoder:
    """Incremental decoding for generation: `step(id)` returns only complete characters.

    A byte-fallback character (`<0xE0><0xA4><0xB9>` = ह) or a byte-level piece can need several
    tokens before it is valid UTF-8; until then `step` returns "" and keeps the bytes pending.
    Wraps `tokenizers.decoders.DecodeStream`, which also handles decoders that look at
    neighbouring tokens (WordPiece '##', ByteLevel).
    """

    def __init__(self, backend: BackendTokenizer, skip_special: bool = True):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, int(token_id)) or ""


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.backend`) plus the roles of its special tokens."""

    def __init__(self, backend: BackendTokenizer, roles: dict[str, str | None] | None = None,
                 sentinels: list[str] | None = None, meta: dict[str, Any] | None = None):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.roles = {role: None for role in ROLES}
        self.roles.update({r: t for r, t in (roles or guess_roles(vocab)).items() if r in ROLES})
        for role, token in self.roles.items():
            if token is not None and token not in vocab:
                log.warning("%s token %r is not in the vocabulary; this tokenizer has no %s",
                            role, token, role)
                self.roles[role] = None
        if sentinels is None:
            sentinels = sorted((t for t in vocab if SENTINEL.fullmatch(t)),
                               key=lambda t: int(SENTINEL.fullmatch(t).group(1)))
        self.sentinels = list(sentinels)
        self.meta = dict(meta or {})
        self._read_text: str | None = None  # tokenizer.json as read from disk (set by load_tokenizer)
        self.vocab_size = max(vocab.values()) + 1  # every id is < vocab_size (embedding rows)
        ids = {role: vocab[t] if t is not None else None for role, t in self.roles.items()}
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.pad_id: int | None = ids["pad"]
        self.unk_id: int | None = ids["unk"]
        self.mask_id: int | None = ids["mask"]
        self.sentinel_ids: list[int] = [vocab[t] for t in self.sentinels]
        added = backend.get_added_tokens_decoder()
        self.special_ids: set[int] = ({i for i, t in added.items() if t.special}
                                      | {i for i in ids.values() if i is not None}
                                      | set(self.sentinel_ids))
        self.byte_ids: dict[int, int] = {i: int(m.group(1), 16) for t, i in vocab.items()
                                         if (m := BYTE_TOKEN.fullmatch(t))}

    # ------------------------------------------------------------ encode / decode

    def treat_special_strings_as_text(self) -> "Tokenizer":
        """From now on, a literal `<eos>` (or any special token's string) in the input is encoded as
        ordinary text. Corpora are text: a web page that spells out `<eos>` must not end a document in
        the middle. Prompts typed by a person keep the default (specials are recognised)."""
        self.backend.encode_special_tokens = True
        return self

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds what the post-processor adds (our: bos)."""
        return self.backend.encode(text, add_special_tokens=add_special).ids

    def encode_batch(self, texts: list[str], add_special: bool = False) -> list[list[int]]:
        """Ids of many texts at once, in parallel in Rust (no offsets computed)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=add_special)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_stream(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh incremental decoder; call `.step(id)` per generated token."""
        return StreamDecoder(self.backend, skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------ identity

    @property
    def canonical_json(self) -> str:
        """tokenizer.json exactly as `save` writes it: its stable form (see `stable_json`)."""
        return stable_json(self.backend, self._read_text)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the canonical tokenizer.json: equal ids for equal hashes. (Computed once:
        change a pipeline through a new `Tokenizer`, not by mutating `.backend` in place.)"""
        return hashlib.sha256(self.canonical_json.encode("utf-8")).hexdigest()

    @property
    def kind(self) -> str:
        return self.meta.get("kind") or detect_kind(self.backend)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

    # ------------------------------------------------------------ saving

    def save(self, out_dir: str | Path) -> Path:
        """Write the HF-loadable folder plus slmforge_tokenizer.json; returns the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = self.canonical_json
        special_map = {f"{r}_token": t for r, t in self.roles.items() if t is not None}
        if self.sentinels:
            special_map["additional_special_tokens"] = list(self.sentinels)
        hf_config = {
            **self.meta.get("hf_settings", {}),  # e.g. chat_template, cls_token of an imported one
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            # HF's default cleanup rewrites " ." to "." and breaks exact round trips.
            "clean_up_tokenization_spaces": False,
        }
        hf_config.setdefault("model_max_length", 1_000_000_000)
        meta = {
            "format": FORMAT,
            **self.meta,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "special_tokens": {**self.roles, "sentinels": list(self.sentinels)},
        }
        write_text_atomic(out / TOKENIZER_FILE, text)
        write_text_atomic(out / HF_CONFIG_FILE, _dumps(hf_config))
        write_text_atomic(out / HF_SPECIAL_FILE, _dumps(special_map))
        write_text_atomic(out / META_FILE, _dumps(meta))
        return out


def stable_json(backend: BackendTokenizer, read_text: str | None = None) -> str:
    """`backend` serialized in the form that reads back to the same text.

    `tokenizers` parses JSON floats with serde_json's fast path, which can land one ulp off: a
    Unigram model built from exact scores (an imported SentencePiece model) writes `-7.2557525634765625`
    and reads back `-7.255752563476563`. Writing that first text would make every later load see a
    different tokenizer.json (a "changed after it was written" warning, and a sha256 unlike the one
    `data prepare` records); one more round trip reaches the fixed point. `read_text` is the text the
    backend was loaded from, if any: when it serializes back to exactly that, no parse is needed.
    """
    text = backend.to_str(pretty=True)
    if text == read_text:
        return text
    for _ in range(STABLE_ROUNDS):
        again = BackendTokenizer.from_str(text).to_str(pretty=True)
        if again == text:
            return text
        text = again
    log.warning("tokenizer.json did not reach a stable form after %d round trips through `tokenizers`; "
                "loading it will report a changed sha256", STABLE_ROUNDS)
    return text


def _dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def bos_post_processor(bos: str | None, bos_id: int | None) -> processors.PostProcessor | None:
    """`add_special=True` prepends bos (as Llama and Gemma do; eos is the data pipeline's call)."""
    if bos is None or bos_id is None:
        return None
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def detect_kind(backend: BackendTokenizer) -> str:
    """bpe / bytelevel / unigram / wordpiece (or the model type) from the pipeline itself."""
    data = json.loads(backend.to_str())
    model = data.get("model", {}).get("type", "?")
    if model == "BPE":
        return "bytelevel" if "ByteLevel" in json.dumps(data.get("decoder")) else "bpe"
    return {"Unigram": "unigram", "WordPiece": "wordpiece"}.get(model, model.lower())


def guess_roles(vocab: dict[str, int]) -> dict[str, str | None]:
    return {role: next((t for t in names if t in vocab), None) for role, names in ROLE_GUESSES.items()}


# ---------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer folder (ours or any HF folder with tokenizer.json) or a tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        folder, file = path, path / TOKENIZER_FILE
    elif path.is_file():
        folder, file = path.parent, path
    else:
        raise SlmforgeError(f"{path}: tokenizer not found (expected a folder with {TOKENIZER_FILE}; "
                            f"make one with `slmforge tokenizer train` or `slmforge tokenizer import`)")
    if not file.is_file():
        raise SlmforgeError(f"{folder}: no {TOKENIZER_FILE} in this folder (make one with "
                            f"`slmforge tokenizer train` or `slmforge tokenizer import`)")
    try:
        text = file.read_text(encoding="utf-8")
        backend = BackendTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise SlmforgeError(f"{file}: corrupt or unsupported tokenizer.json ({_one_line(e)})") from None
    meta = _read_json(folder / META_FILE) if file.name == TOKENIZER_FILE else None
    if meta is not None:
        if meta.get("format") != FORMAT:
            raise SlmforgeError(f"{folder / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
        special = meta.get("special_tokens", {})
        tok = Tokenizer(backend, {r: special.get(r) for r in ROLES}, special.get("sentinels"), meta)
        tok._read_text = text
        if meta.get("tokenizer_sha256") not in (None, tok.sha256):
            log.warning("%s: tokenizer.json was changed after it was written (sha256 differs from "
                        "%s); recorded metadata may not describe it", folder, META_FILE)
        return tok
    roles = hf_roles(folder)
    tok = Tokenizer(backend, roles if any(roles.values()) else None)
    tok._read_text = text
    return tok


def hf_roles(folder: Path) -> dict[str, str | None]:
    """Special-token roles from HF's tokenizer_config.json / special_tokens_map.json.

    BERT-style tokenizers name no bos/eos; their [CLS] and [SEP] play those parts.
    """
    merged: dict[str, Any] = {}
    for name in (HF_SPECIAL_FILE, HF_CONFIG_FILE):  # tokenizer_config.json wins
        data = _read_json(folder / name)
        if isinstance(data, dict):
            merged.update(data)

    def token(key: str) -> str | None:
        value = merged.get(key)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        return value if isinstance(value, str) and value else None

    return special_roles(token)


def special_roles(token: Callable[[str], str | None]) -> dict[str, str | None]:
    """Our special-token roles from HF attribute names (`token("bos_token")` -> "<s>" or None).
    BERT-style tokenizers name no bos/eos; their [CLS] and [SEP] play those parts."""
    return {"bos": token("bos_token") or token("cls_token"), "eos": token("eos_token") or token("sep_token"),
            "pad": token("pad_token"), "unk": token("unk_token"), "mask": token("mask_token")}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    return read_json(path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
