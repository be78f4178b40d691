"""Bring an existing tokenizer (HF folder or SentencePiece model) into our folder format.

What is imported is kept exactly: same pipeline, same ids, same special tokens. If its normalizer
deletes combining marks (uncased BERT strips accents: every nonspacing mark, so also the Hindi
virama, nukta, anusvara and several vowel signs), that is its real behavior and we keep it, but say
so loudly: such a tokenizer cannot represent Indic text.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from slmforge.errors import SlmforgeError
from slmforge.fileio import read_json
from slmforge.tokenizer import pretokenize
from slmforge.tokenizer.spm_convert import convert_sentencepiece
from slmforge.tokenizer.tokenizer import (
    HF_CONFIG_FILE,
    META_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    bos_post_processor,
    hf_roles,
    load_tokenizer,
    special_roles,
)

log = logging.getLogger(__name__)

# tokenizer_config.json classes that say nothing model-specific about a .model file.
GENERIC_CLASSES = {None, "PreTrainedTokenizerFast", "TokenizersBackend", "PreTrainedTokenizer"}
# HF settings worth carrying over; the rest of the pipeline is in tokenizer.json.
HF_KEPT = ("chat_template", "model_max_length", "cls_token", "sep_token")


def import_tokenizer(src: str | Path, out_dir: str | Path) -> Path:
    """Convert `src` and save it to `out_dir` as a full slmforge/HF tokenizer folder.

    `src` is a folder with an HF `tokenizer.json` (e.g. bert-base-uncased, XLM-R), a `tokenizer.json`
    file, a SentencePiece `.model` file, or a folder with one. A folder without tokenizer.json whose
    tokenizer_config.json names a model class (XLMRobertaTokenizer, T5Tokenizer, BertTokenizer, ...)
    is converted by `transformers`, which applies that class's conventions (XLM-R shifts
    SentencePiece ids by one, fairseq style); a bare `.model` keeps SentencePiece's own ids.
    """
    tok = read_foreign(Path(src))
    if pretokenize.strips_marks(tok.backend.normalizer):
        message = (f"{src}: this tokenizer's normalizer deletes combining marks (strip_accents, as in "
                   f"uncased BERT): Hindi virama, nukta, anusvara and vowel signs ु ू े ै, Assamese "
                   f"hasanta, nukta and vowel signs ু ূ are lost (हिन्दी -> हिनदी), so "
                   f"decode(encode(text)) != text. Imported as is; prefer a cased or byte-fallback "
                   f"tokenizer for Indic text")
        log.warning(message)
        tok.meta.setdefault("warnings", []).append(message)
    return tok.save(out_dir)


def read_foreign(src: Path) -> Tokenizer:
    if src.is_file():
        if src.suffix == ".model":
            return _from_sentencepiece(src)
        if src.suffix == ".json":
            return _from_tokenizer_json(src.parent, src)
        raise SlmforgeError(f"{src}: expected a tokenizer.json, a SentencePiece .model or a folder")
    if not src.is_dir():
        raise SlmforgeError(f"{src}: not found")
    if (src / TOKENIZER_FILE).is_file():
        return _from_tokenizer_json(src, src / TOKENIZER_FILE)
    # No tokenizer.json: a class named in tokenizer_config.json tells transformers how to build one
    # from what is there (tokenizer.model, vocab.txt, vocab.json + merges.txt).
    hf_class = _hf_config(src).get("tokenizer_class")
    if hf_class not in GENERIC_CLASSES:
        return _via_transformers(src, hf_class)
    models = sorted(src.glob("*.model"))
    if not models:
        raise SlmforgeError(f"{src}: no {TOKENIZER_FILE} and no SentencePiece *.model in this folder")
    model = src / "tokenizer.model" if (src / "tokenizer.model").is_file() else models[0]
    if len(models) > 1 and model.name != "tokenizer.model":
        raise SlmforgeError(f"{src}: several .model files ({', '.join(m.name for m in models)}); "
                            f"pass the one to import")
    return _from_sentencepiece(model)


def _hf_config(folder: Path) -> dict:
    path = folder / HF_CONFIG_FILE
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _kept_settings(folder: Path) -> dict:
    config = _hf_config(folder)
    kept = {k: config[k] for k in HF_KEPT if config.get(k) is not None}
    return {"hf_settings": kept} if kept else {}


def _from_tokenizer_json(folder: Path, file: Path) -> Tokenizer:
    tok = load_tokenizer(file)  # same checks and error messages as loading our own folders
    source = {"path": str(file), "format": "tokenizer.json"}
    if file.name == TOKENIZER_FILE and (folder / META_FILE).is_file():
        tok.meta["source"] = source  # one of ours: keep its roles and training record
        return tok
    roles = hf_roles(folder)
    if any(roles.values()):
        tok = Tokenizer(tok.backend, roles)
    tok.meta = {"source": source, **_kept_settings(folder)}
    return tok


def _from_sentencepiece(model: Path) -> Tokenizer:
    backend, roles = convert_sentencepiece(model)
    post = bos_post_processor(roles["bos"], backend.token_to_id(roles["bos"]) if roles["bos"] else None)
    if post is not None:
        backend.post_processor = post
    return Tokenizer(backend, roles, meta={"source": {"path": str(model), "format": "sentencepiece"}})


def _via_transformers(folder: Path, hf_class: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SlmforgeError(f"{folder}: converting a {hf_class} .model needs `transformers` "
                            f"(pip install 'slmforge[hf]'); or pass the .model file itself to keep "
                            f"SentencePiece's own ids") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a bad folder
        raise SlmforgeError(f"{folder}: transformers could not load {hf_class} ({e})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, BackendTokenizer):
        raise SlmforgeError(f"{folder}: {hf_class} has no `tokenizers` backend to import")

    def token(name: str) -> str | None:
        value = getattr(hf, name, None)
        return str(value) if value else None

    roles = special_roles(token)
    meta = {"source": {"path": str(folder), "format": f"sentencepiece via transformers {hf_class}"},
            **_kept_settings(folder)}
    return Tokenizer(BackendTokenizer.from_str(backend.to_str()), roles, meta=meta)
