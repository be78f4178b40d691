"""`slmforge export --format hf`: a run's model as a folder `transformers` loads as-is.

    out/
        config.json              # e.g. Gemma3ForCausalLM, LlamaForCausalLM, BertForMaskedLM, ModernBertForMaskedLM,
                                 # T5ForConditionalGeneration;
                                 # readable by transformers 4.5x and 5.x
        generation_config.json   # decoders, encoder-decoders: bos / eos / pad (/ decoder start) ids
        model.safetensors        # transformers' tensor names; tied models store embed_tokens only
        tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...

No `transformers` import: names and config fields come from `slmforge.models.hf`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from slmforge import fileio
from slmforge.errors import SlmforgeError
from slmforge.models.hf import (
    check_exportable,
    config_to_hf,
    generation_config,
    state_dict_to_hf,
)
from slmforge.checkpoint.reading import check_tokenizer, find_tokenizer_dir, open_run
from slmforge.models.registry import family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Tokenizer files a Hugging Face folder may hold; copied in both directions when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "slmforge_tokenizer.json")


def export_hf(run: str | Path, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Write the model of a run (or checkpoint) folder to `out` in Hugging Face format. Returns `out`."""
    if dtype not in DTYPES:
        raise SlmforgeError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    opened = open_run(run)
    model, step_dir = opened.model, opened.step_dir
    cfg = model.cfg
    check_exportable(cfg)
    from slmforge.tokenizer import load_tokenizer

    tokenizer_dir = find_tokenizer_dir(run)
    check_tokenizer(load_tokenizer(tokenizer_dir).sha256, tokenizer_dir, step_dir, opened.info)  # not a swapped one
    ids = special_token_ids(tokenizer_dir)
    out = Path(out)
    with output_dir(out, force) as tmp:
        tensors = state_dict_to_hf(cfg, model.state_dict(), DTYPES[dtype])
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})  # transformers requires "pt"
        fileio.make_readable(tmp / "model.safetensors")  # safetensors writes 0600
        write_json(tmp / "config.json", config_to_hf(cfg, dtype=dtype, **ids))
        kind = family(cfg).kind
        if kind == "decoder":  # encoders do not generate
            write_json(tmp / "generation_config.json", generation_config(**ids))
        if kind == "encoder-decoder":
            write_json(tmp / "generation_config.json",
                       {**generation_config(**ids), "decoder_start_token_id": cfg.decoder_start_token_id})
        copy_tokenizer_files(tokenizer_dir, tmp, model_max_length=cfg.max_seq_len)
        if kind == "encoder":  # a pair's second segment is type 1 only where the model has two types
            wrap_encoder_inputs(tmp / "tokenizer.json", pair_type=1 if cfg.type_vocab_size > 1 else 0)
            config = read_json_if_present(tmp / "tokenizer_config.json")
            if cfg.type_vocab_size > 1 and config and "model_input_names" not in config:  # hand them to the model
                write_json(tmp / "tokenizer_config.json",
                           {**config, "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]})
        if kind == "encoder-decoder":
            wrap_encoder_inputs(tmp / "tokenizer.json", bos=False)
    return out


def wrap_encoder_inputs(tokenizer_json: Path, bos: bool = True, pair_type: int = 1) -> None:
    """Make `tokenizer(text)` in transformers give `bos text eos` ([CLS] ... [SEP], <s> ... </s>): the
    layout the encoder was trained on, which fill-mask pipelines and classifiers feed it. With
    bos=False, `text eos`: T5's source layout (span corruption ends every source with eos)."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import processors

    from slmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_json.parent)
    bos_token, eos = tokenizer.roles.get("bos") if bos else "", tokenizer.roles.get("eos")
    if bos_token is None or eos is None:
        return
    backend = BackendTokenizer.from_file(str(tokenizer_json))
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A {eos}", pair=f"{bos_token} $A {eos} $B:{pair_type} {eos}:{pair_type}",
            special_tokens=[(bos_token, tokenizer.bos_id), (eos, tokenizer.eos_id)])
    else:
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_id)])
    text = backend.to_str(pretty=True)
    fileio.write_text_atomic(tokenizer_json, text)
    meta_path = tokenizer_json.parent / "slmforge_tokenizer.json"
    if meta_path.is_file():  # keep our record of the file's hash true, so loading it does not warn
        meta = read_json(meta_path)
        meta["tokenizer_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        write_json(meta_path, meta)


# ---------------------------------------------------------------- tokenizer files


def special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} of a run's tokenizer folder."""
    from slmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def copy_tokenizer_files(src: Path, dst: Path, model_max_length: int | None = None) -> list[str]:
    """Copy the tokenizer files present in `src`; make tokenizer_config.json loadable by AutoTokenizer."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    config = read_json_if_present(dst / "tokenizer_config.json")
    # Without a tokenizer_class, AutoTokenizer picks the model family's own class, which may rebuild the
    # pipeline (normaliser, pre-tokenizer) its way; the generic class uses tokenizer.json exactly as saved.
    changed = {"tokenizer_class": "PreTrainedTokenizerFast"} if "tokenizer_class" not in config else {}
    # A tokenizer trained on its own says "no limit" (1e9 or more); the exported model has a context length.
    if model_max_length is not None and config.get("model_max_length", 1e9) >= 1e9:
        changed["model_max_length"] = model_max_length
    if changed and (dst / "tokenizer.json").is_file():
        write_json(dst / "tokenizer_config.json", {**config, **changed})
        if "tokenizer_config.json" not in copied:
            copied.append("tokenizer_config.json")
    return copied


# ---------------------------------------------------------------- files


def read_json_if_present(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an HF folder; missing, corrupt or non-object files are one clear error."""
    try:
        data = fileio.read_json(path)
    except FileNotFoundError:
        raise SlmforgeError(f"{path}: not found") from None
    if not isinstance(data, dict):
        raise SlmforgeError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh `out.partial` folder; move it to `out` when the block succeeds, delete it if not.

    A crash or an error never leaves a half-written `out`, and a non-empty `out` is replaced only if forced.
    """
    if out.exists() and not out.is_dir():
        raise SlmforgeError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SlmforgeError(f"{out}: exists and is not empty; choose another folder or pass --force")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
