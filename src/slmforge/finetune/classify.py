"""Encoders fine-tuned for a task: `finetune.task = "classify"` (a label per text or text pair) and
`"tag"` (a BIO tag per word), on the same Trainer, run folder, exact resume and LoRA as every other
fine-tune. The model keeps its encoder and gets a classification head (`models/heads.py`) in place of
the masked-LM head, recorded in its config (`head`, `labels`): eval, `slmforge classify` and export
read id2label from there.

Examples are JSONL (field names configurable, finetune.*_field):

    classify   {"text": "...", "text_pair": "..." (optional), "label": "positive"}
    tag        {"tokens": ["Ram", "lives", "in", "Delhi"], "tags": ["B-PER", "O", "O", "B-LOC"]}

A text becomes `[CLS] text [SEP]` (bos / eos of the tokenizer: <s> ... </s> for RoBERTa vocabularies),
a pair `[CLS] text [SEP] pair [SEP]` with token types 0 then 1 where the model has token types (what
the exported tokenizer gives for `tokenizer(text, pair)`). Words are tokenized one at a time, so a word
stays whole whatever the tokenizer would do across word boundaries (Devanagari or Bengali words keep
their matras); a word's label sits on its first token and its other tokens carry none.

The label set is finetune.labels, else the labels of the model being continued (an imported
*ForSequenceClassification, or an earlier run), else every label in the training files, sorted.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from slmforge import config as config_io
from slmforge.checkpoint.meta import CheckpointMeta
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import DEFAULT_LORA_TARGETS, FinetuneConfig
from slmforge.finetune.examples import BadExample, Skipped, bad_example, read_lines, read_records
from slmforge.finetune.label_metrics import classification_report, entity_report
from slmforge.finetune.loader import RowLoader
from slmforge.finetune.lora import BASE_DIR, LoraCheckpoints, apply_lora
from slmforge.formatting import human, say
from slmforge.models import build_model, family
from slmforge.objectives.base import IGNORE_INDEX
from slmforge.objectives.classify import Classification
from slmforge.checkpoint.reading import (
    check_names_and_shapes,
    checkpoint_tensors,
    find_tokenizer_dir,
    require_intact,
    resolve_checkpoint,
    write_eval_report,
)
from slmforge.train.session import Session

TASKS = ("classify", "tag")


# ---------------------------------------------------------------- examples


@dataclass
class LabeledExample:
    where: str
    """file:line."""
    text: str | None = None
    pair: str | None = None
    label: str | None = None
    """classify: the text (and pair) and its label (None when predicting)."""
    words: list[str] | None = None
    tags: list[str] | None = None
    """tag: the words and their tags (None when predicting)."""


def _bio(tag: str) -> bool:
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def parse_labeled(record: dict, ex, where: str, task: str, labeled: bool = True) -> LabeledExample:
    """One JSONL object as a classify or tag example (`labeled`: the label or tags are required)."""
    if task == "tag":
        words = record.get(ex.tokens_field)
        if ex.tokens_field not in record:
            raise BadExample("missing field", f"no field {ex.tokens_field!r} (fields: {', '.join(map(repr, record))})")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise BadExample("bad words", f"field {ex.tokens_field!r} must be a non-empty list of non-empty strings")
        if not labeled:
            return LabeledExample(where, words=words)
        tags = record.get(ex.tags_field)
        if ex.tags_field not in record:
            raise BadExample("missing field", f"no field {ex.tags_field!r} (fields: {', '.join(map(repr, record))})")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadExample("bad tags", f"field {ex.tags_field!r} must be a list of strings")
        if len(tags) != len(words):
            raise BadExample("bad tags", f"{len(tags)} tags for {len(words)} words")
        wrong = next((t for t in tags if not _bio(t)), None)
        if wrong is not None:
            raise BadExample("bad tags", f"tag {wrong!r} is not BIO (O, B-TYPE or I-TYPE)")
        return LabeledExample(where, words=words, tags=tags)
    text = _text(record, ex.text_field)
    pair = None
    if ex.text_pair_field and record.get(ex.text_pair_field) is not None:
        pair = _text(record, ex.text_pair_field)
    if not labeled:
        return LabeledExample(where, text=text, pair=pair)
    if ex.label_field not in record:
        raise BadExample("missing field", f"no field {ex.label_field!r} (fields: {', '.join(map(repr, record))})")
    label = record[ex.label_field]
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise BadExample("bad label", f"field {ex.label_field!r} must be a non-empty string or an integer, "
                                      f"got {label!r}")
    return LabeledExample(where, text=text, pair=pair, label=str(label))


def _text(record: dict, name: str) -> str:
    if name not in record:
        raise BadExample("missing field", f"no field {name!r} (fields: {', '.join(map(repr, record)) or 'none'})")
    value = record[name]
    if not isinstance(value, str):
        raise BadExample("not text", f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadExample("empty text", f"field {name!r} is empty")
    return value


def read_labeled(paths: list[str], ex, task: str, skipped: Skipped, labeled: bool = True) -> list[LabeledExample]:
    """Every usable example of `paths`, in file and line order; a bad line fails or is counted."""
    return read_records(paths, ex.on_bad_example, skipped,
                        lambda record, where: parse_labeled(record, ex, where, task, labeled))


def _label_order(label: str) -> tuple:
    """Integer labels by value (2 before 10), then the others by name."""
    return (0, int(label), "") if re.fullmatch(r"-?[0-9]+", label) else (1, 0, label)


def labels_in(examples: list[LabeledExample]) -> list[str]:
    """The labels (classify) or tags (tag) the examples use, sorted."""
    seen = {e.label for e in examples if e.label is not None}
    for e in examples:
        seen.update(e.tags or [])
    return sorted(seen, key=_label_order)


# ---------------------------------------------------------------- tokens


@dataclass
class EncodedLabels:
    where: str
    ids: np.ndarray
    """[CLS] text [SEP] (pair [SEP]) token ids."""
    types: np.ndarray | None
    """Token type per id (0 first segment, 1 the pair), for models with token types."""
    labels: np.ndarray
    """classify: (1,) the label id; tag: one per token, the word's label on its first token, else -100."""
    first: np.ndarray | None = None
    """tag: the position of each word's first token."""

    @property
    def length(self) -> int:
        return len(self.ids)


@contextmanager
def literal_specials(tokenizer):
    """Encode a literal "[SEP]" or "<s>" in a text as text, as corpora are encoded, and restore the
    tokenizer's own setting afterwards."""
    backend = tokenizer.backend
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        backend.encode_special_tokens = before


class LabelEncoder:
    """Examples -> EncodedLabels for one tokenizer, task and label set."""

    def __init__(self, tokenizer, task: str, labels: list[str], token_types: bool):
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise SlmforgeError(f"finetune.task = {task!r}: the tokenizer needs bos and eos tokens to frame a text "
                                f"([CLS] ... [SEP] or <s> ... </s>); it has bos {tokenizer.roles.get('bos')!r}, "
                                f"eos {tokenizer.roles.get('eos')!r}")
        self.tokenizer, self.task, self.labels = tokenizer, task, list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.token_types = token_types
        self._words: dict[str, list[int]] = {}

    def _label_id(self, label: str) -> int:
        if label not in self.index:
            shown = ", ".join(self.labels[:8]) + (" ..." if len(self.labels) > 8 else "")
            raise BadExample("unknown label", f"label {label!r} is not one of the run's labels ({shown}); "
                                              f"finetune.labels sets the label set")
        return self.index[label]

    def word_ids(self, word: str) -> list[int]:
        if word not in self._words:
            ids = self.tokenizer.encode(word)
            if not ids and self.tokenizer.unk_id is not None:
                ids = [self.tokenizer.unk_id]
            self._words[word] = ids
        return self._words[word]

    def encode(self, example: LabeledExample, limit: int, truncate: bool = False) -> EncodedLabels:
        """Token ids, types and labels of `example`; longer than `limit` tokens is a BadExample, or, for
        texts with `truncate`, cut (the longer of text and pair first, as transformers' longest_first)."""
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        if self.task == "tag":
            ids, first, labels = [bos], [], [IGNORE_INDEX]
            for i, word in enumerate(example.words):
                pieces = self.word_ids(word)
                if not pieces:
                    raise BadExample("empty word", f"word {i} ({word!r}) makes no token")
                first.append(len(ids))
                ids += pieces
                labels += ([self._label_id(example.tags[i])] if example.tags is not None else [IGNORE_INDEX])
                labels += [IGNORE_INDEX] * (len(pieces) - 1)
            ids.append(eos)
            labels.append(IGNORE_INDEX)
            if len(ids) > limit:
                raise BadExample("too long", f"{len(ids)} tokens, more than {limit}")
            return EncodedLabels(example.where, np.array(ids, dtype=np.int64),
                                 np.zeros(len(ids), dtype=np.int64) if self.token_types else None,
                                 np.array(labels, dtype=np.int64), np.array(first, dtype=np.int64))
        with literal_specials(self.tokenizer):
            text = self.tokenizer.encode(example.text)
            pair = self.tokenizer.encode(example.pair) if example.pair is not None else None
        room = limit - 2 - (1 if pair is not None else 0)
        total = len(text) + (len(pair) if pair is not None else 0)
        if total > room:
            if not truncate or room < 2:
                raise BadExample("too long", f"{total + limit - room} tokens, more than {limit}")
            while len(text) + (len(pair) if pair is not None else 0) > room:
                if pair is not None and len(pair) > len(text):
                    pair.pop()
                else:
                    text.pop()
        ids = [bos, *text, eos]
        types = [0] * len(ids)
        if pair is not None:
            ids += [*pair, eos]
            types += [1] * (len(pair) + 1)
        label = self._label_id(example.label) if example.label is not None else IGNORE_INDEX
        return EncodedLabels(example.where, np.array(ids, dtype=np.int64),
                             np.array(types, dtype=np.int64) if self.token_types else None,
                             np.array([label], dtype=np.int64))


def encode_labeled(examples: list[LabeledExample], encoder: LabelEncoder, limit: int, on_bad: str,
                   skipped: Skipped, limit_name: str = "train.seq_len") -> list[EncodedLabels]:
    out = []
    for example in examples:
        try:
            out.append(encoder.encode(example, limit))
        except BadExample as e:
            detail = str(e).replace(f"more than {limit}", f"more than {limit_name} = {limit}")
            bad_example(on_bad, skipped, example.where, e.reason, detail)
    return out


# ---------------------------------------------------------------- batches


class LabelLoader(RowLoader):
    """One example per row, padded to the longest of its batch (pad id, mask 0, labels -100)."""

    def __init__(self, examples: list[EncodedLabels], batch_size: int, *, pad_id: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, training: bool = True):
        self.examples, self.pad_id = examples, pad_id
        super().__init__([[i] for i in range(len(examples))], batch_size, seed=seed, shuffle=shuffle, rank=rank,
                         world_size=world_size, training=training, examples=len(examples))

    @property
    def fill(self) -> float:
        return 1.0

    def _batch(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        batch = collate_examples([self.examples[self.rows[r][0]] for r in rows], self.pad_id)
        batch["sample_ids"] = torch.from_numpy(epoch * self.num_windows + rows.astype(np.int64))
        return batch

    def _unscored(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def collate_examples(examples: list[EncodedLabels], pad_id: int) -> dict[str, torch.Tensor]:
    """A raw batch of `examples` (see objectives/classify.py)."""
    width = max(e.length for e in examples)
    tokens = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    tagging = examples[0].first is not None
    labels = (np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64) if tagging
              else np.array([e.labels[0] for e in examples], dtype=np.int64))
    types = np.zeros((len(examples), width), dtype=np.int64) if examples[0].types is not None else None
    for b, e in enumerate(examples):
        tokens[b, :e.length], mask[b, :e.length] = e.ids, 1
        if tagging:
            labels[b, :e.length] = e.labels
        if types is not None:
            types[b, :e.length] = e.types
    raw = {"tokens": torch.from_numpy(tokens), "attention_mask": torch.from_numpy(mask),
           "labels": torch.from_numpy(labels)}
    if types is not None:
        raw["token_type_ids"] = torch.from_numpy(types)
    return raw


# ---------------------------------------------------------------- predictions and scores


@torch.no_grad()
def predict(model: nn.Module, examples: list[EncodedLabels], pad_id: int, batch_size: int = 32
            ) -> list[np.ndarray]:
    """Label probabilities per example: (labels,) for classify, (words, labels) for tag (each word's
    first token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    objective = Classification(model.cfg.head)
    out: list[np.ndarray] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in objective.collate(collate_examples(chunk, pad_id)).items()}
            probs = torch.softmax(objective.logits(model, batch).float(), dim=-1).cpu().numpy()
            for b, e in enumerate(chunk):
                out.append(probs[b] if e.first is None else probs[b, e.first])
    finally:
        model.train(was_training)
    return out


def score(examples: list[EncodedLabels], probabilities: list[np.ndarray], labels: list[str]) -> dict[str, Any]:
    """classify: accuracy, macro-F1 and per-label figures; tag: entity precision / recall / F1 (micro,
    and per type) and word accuracy. Against the examples' own labels."""
    names = np.array(labels)
    if examples and examples[0].first is None:
        gold = [labels[int(e.labels[0])] for e in examples]
        return classification_report(gold, [labels[int(p.argmax())] for p in probabilities])
    gold = [list(names[e.labels[e.first]]) for e in examples]
    return entity_report(gold, [list(names[p.argmax(-1)]) for p in probabilities])


def summary_line(report: dict[str, Any]) -> str:
    if "macro_f1" in report:
        return f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}"
    return (f"entity precision {report['precision']:.4f}, recall {report['recall']:.4f}, F1 {report['f1']:.4f} "
            f"({report['entities']} entities); words right {report['word_accuracy']:.4f}")


# ---------------------------------------------------------------- fine-tuning


def finetune_labels(cfg: FinetuneConfig, session: Session) -> Path:
    """`slmforge finetune` with finetune.task = "classify" or "tag" (see the module docstring)."""
    from slmforge.checkpoint.writing import write_model_folder
    from slmforge.finetune.run import _freeze, finetune_identity
    from slmforge.train.parallel import barrier
    from slmforge.train.run import RunParts, TrainingRun

    loop, ex = cfg.train, cfg.finetune
    run_dir, resume_dir, device, where = session.run_dir, session.resume_dir, session.device, session.where
    run = TrainingRun.start(cfg, session)

    tokenizer, init_dir, init_head = _model_and_tokenizer(cfg, session)
    if loop.seq_len > cfg.model.max_seq_len:
        raise SlmforgeError(f"train.seq_len: {loop.seq_len} exceeds the model's context, model.max_seq_len = "
                            f"{cfg.model.max_seq_len}; lower train.seq_len")
    skipped = Skipped()
    train_raw = read_labeled(ex.train_files, ex, ex.task, skipped)
    val_raw = read_labeled(ex.val_files, ex, ex.task, skipped) if ex.val_files else None
    labels = _choose_labels(cfg, train_raw, init_head, resume_dir is not None)
    keep_head = init_head is not None and init_head == (ex.task, labels)
    cfg.model.head, cfg.model.labels = ex.task, labels
    if ex.task != "classify":
        cfg.model.pooling = None
    cfg.model.validate()
    pad_id = _pad_id(cfg, tokenizer)

    encoder = LabelEncoder(tokenizer, ex.task, labels, token_types=cfg.model.type_vocab_size > 1)
    train = encode_labeled(train_raw, encoder, loop.seq_len, ex.on_bad_example, skipped)
    if val_raw is not None:
        val = encode_labeled(val_raw, encoder, loop.seq_len, ex.on_bad_example, skipped)
    elif ex.val_fraction > 0 and len(train) >= 10:
        order = np.random.default_rng([loop.seed, 7]).permutation(len(train))
        held = set(order[:max(1, round(ex.val_fraction * len(train)))].tolist())
        val = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    else:
        val = []
    if skipped.total:
        say(f"skipped {skipped.total} example(s): {skipped.summary()}")
    if not train:
        raise SlmforgeError(f"finetune.train_files: no usable examples in {', '.join(ex.train_files)}")

    if init_dir is None:  # seeded, or left for the resume to fill (FSDP2: built on meta, initialised per shard)
        model = run.build()
    else:  # whole: the encoder's weights go into it; a new head keeps its seeded initialisation
        model = build_model(cfg.model, device=device, seed=loop.seed)
    if init_dir is not None:
        _load_encoder(model, init_dir, keep_head)
        say(f"initialised the encoder from {init_dir}; "
            + ("kept its classification head" if keep_head else f"new {ex.task} head for {len(labels)} labels"))
    base_meta = _meta(cfg, tokenizer)
    checkpoint_format = None
    if cfg.lora.rank:
        if resume_dir is None and where.is_main:
            write_model_folder(run_dir / BASE_DIR, model, {**base_meta, "role": "LoRA base weights"})
        barrier()
        if cfg.lora.target_modules == DEFAULT_LORA_TARGETS:  # the projections this family has
            names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
            cfg.lora.target_modules = [t for t in DEFAULT_LORA_TARGETS if t in names]
        targets = apply_lora(model, cfg.lora)
        inside = [t for t in targets if t.startswith("classifier.")]
        if inside:
            raise SlmforgeError(f"lora.target_modules: {inside[0]} is part of the classification head, which trains "
                                f"whole; name encoder modules only")
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                param.requires_grad_(True)
        checkpoint_format = HeadLoraCheckpoints(cfg.lora, run_dir)
        say(f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {len(targets)} modules; the head trains whole")
    else:
        _freeze(model, ex.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    split = dict(rank=where.rank, world_size=where.world_size)
    objective = Classification(ex.task)
    train_loader = LabelLoader(train, loop.batch_size, pad_id=pad_id, seed=loop.seed, **split)
    val_batches = None
    if val:
        val_loader = LabelLoader(val, loop.eval_batch_size or loop.batch_size, pad_id=pad_id, shuffle=False,
                                 training=False, **split)
        val_batches = lambda: val_loader.epoch_batches(loop.eval_batches)  # noqa: E731
    description = (f"{cfg.model.family} {ex.task} ({len(labels)} labels) {human(total)} parameters, "
                   f"{human(trainable)} trainable ({100 * trainable / total:.2f}%) | {len(train):,} examples | "
                   f"{len(val):,} held out")
    trainer, held_out = run.fit(RunParts(model=model, objective=objective, train_loader=train_loader,
                                         val_batches=val_batches, fingerprint=_fingerprint(train, labels),
                                         meta=base_meta, description=description,
                                         identity=finetune_identity(cfg, False), checkpoint_format=checkpoint_format))
    if where.is_main and ex.eval_samples and (val or train):
        examples = val or train
        report = score(examples, predict(trainer.model, examples, pad_id, loop.eval_batch_size or 32), labels)
        row = {**(held_out or {}), **report, "step": trainer.state.step}
        write_eval_report({"finetune_held_out" if val else "finetune_train_sample": row},
                          resolve_checkpoint(run_dir) / "eval.json")
        say(f"scored {len(examples)} {'held-out' if val else 'training'} example(s): {summary_line(report)}")
    return run_dir


def _model_and_tokenizer(cfg: FinetuneConfig, session: Session):
    """The model config (its encoder family checked), the run's tokenizer, the folder to take weights
    from (None when resuming or from scratch) and, when that model already has a classification head,
    (its task, its labels)."""
    from slmforge.tokenizer import load_tokenizer

    ex, run_dir = cfg.finetune, session.run_dir
    if session.resume_dir is not None:
        cfg.model = CheckpointMeta.read(session.resume_dir).model_config()
        _check_encoder(cfg)
        return load_tokenizer(run_dir / "tokenizer"), None, (cfg.model.head, list(cfg.model.labels or []))
    init_dir, init_head = None, None
    if cfg.train.init_from:
        init_dir = resolve_checkpoint(cfg.train.init_from)
        require_intact(init_dir)
        cfg.model = CheckpointMeta.read(init_dir).model_config()
        say(f"model config taken from {init_dir}")
        source = find_tokenizer_dir(init_dir)
    else:
        source = Path(ex.tokenizer)
    _check_encoder(cfg)
    if getattr(cfg.model, "has_classifier", False):
        init_head = (cfg.model.head, list(cfg.model.labels))
    tokenizer = load_tokenizer(source)
    if init_dir is None:
        cfg.model.vocab_size = tokenizer.vocab_size
        if cfg.model.family == "roberta" and tokenizer.pad_id is not None:
            cfg.model.pad_token_id = tokenizer.pad_id  # positions count from the pad id
    if session.where.is_main:
        tokenizer.save(run_dir / "tokenizer")
    from slmforge.train.parallel import barrier

    barrier()
    return tokenizer, init_dir, init_head


def _check_encoder(cfg: FinetuneConfig) -> None:
    kind = family(cfg.model).kind
    if kind != "encoder":
        raise SlmforgeError(f"finetune.task: {cfg.finetune.task!r} trains encoders (bert, roberta, modernbert) "
                            f"with a classification head; {cfg.model.family} is {'an' if kind[0] == 'e' else 'a'} "
                            f"{kind} (decoders learn labels as chat answers: finetune.task = \"chat\")")


def _choose_labels(cfg: FinetuneConfig, train: list[LabeledExample], init_head, resuming: bool) -> list[str]:
    """finetune.labels, else the continued model's (same task), else the training files' sorted."""
    ex = cfg.finetune
    given = list(ex.labels)
    if ex.task == "tag":
        wrong = next((t for t in given if not _bio(t)), None)
        if wrong is not None:
            raise SlmforgeError(f"finetune.labels: {wrong!r} is not a BIO tag (O, B-TYPE or I-TYPE)")
    if resuming:
        if init_head[0] != ex.task:
            raise SlmforgeError(f"finetune.task: {ex.task!r}, but the run being resumed trains a {init_head[0]!r} "
                                f"head; start a new train.out_dir for another task")
        saved = init_head[1]
        if given and given != saved:
            raise SlmforgeError(f"finetune.labels: {given} differs from the run's labels {saved}; start a new "
                                f"train.out_dir to train other labels")
        return saved
    if given:
        return given
    if init_head is not None and init_head[0] == ex.task:
        return list(init_head[1])
    found = labels_in(train)
    if len(found) < 2:
        raise SlmforgeError(f"finetune.train_files: {'tags' if ex.task == 'tag' else 'labels'} {found} — a "
                            f"classifier needs examples of at least two labels")
    return found


def _pad_id(cfg: FinetuneConfig, tokenizer) -> int:
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else cfg.model.pad_token_id
    if cfg.model.family == "roberta" and pad != cfg.model.pad_token_id:
        raise SlmforgeError(f"model.pad_token_id: {cfg.model.pad_token_id}, but the tokenizer pads with {pad}; "
                            f"RoBERTa numbers positions from the pad id, so the two must agree")
    return pad


def _load_encoder(model: nn.Module, init_dir: Path, keep_head: bool) -> None:
    """The encoder's weights from `init_dir` (a masked-LM run, an imported model or a fine-tuned
    classifier): every tensor but its head's, checked for names, shapes and finite values; the
    classification head too when `keep_head` (same task and labels), else it stays newly initialised."""
    stored = checkpoint_tensors(init_dir)
    own = "classifier." if keep_head else None
    stored = {name: t for name, t in stored.items()
              if not name.startswith(("head.", "classifier.")) or (own and name.startswith(own))}
    expected = {name: t.shape for name, t in model.state_dict().items()
                if keep_head or not name.startswith("classifier.")}
    check_names_and_shapes(init_dir, {n: t.shape for n, t in stored.items()}, expected)
    for name, tensor in stored.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SlmforgeError(f"{init_dir}: tensor {name} has non-finite values; the checkpoint is damaged")
    with torch.no_grad():
        targets = model.state_dict()
        for name, tensor in stored.items():
            targets[name].copy_(tensor)


def _fingerprint(examples: list[EncodedLabels], labels: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(labels).encode())
    for e in examples:
        for array in (e.ids, e.labels) + ((e.types,) if e.types is not None else ()):
            digest.update(array.tobytes())
    return digest.hexdigest()


def _meta(cfg: FinetuneConfig, tokenizer) -> dict:
    """What eval, classify and export need to know of the checkpoint (the labels are in its model config)."""
    ex = cfg.finetune
    fields = (("text_field", "text_pair_field", "label_field") if ex.task == "classify"
              else ("tokens_field", "tags_field"))
    return {"tokenizer_sha256": tokenizer.sha256, "seq_len": cfg.train.seq_len, "add_bos": True,
            "finetune": {"task": ex.task, "labels": list(cfg.model.labels),
                         **{name: getattr(ex, name) for name in fields},
                         "lora": config_io.to_dict(cfg.lora) if cfg.lora.rank else None,
                         "examples": list(ex.train_files)}}


class HeadLoraCheckpoints(LoraCheckpoints):
    """LoRA on the encoder, the classification head trained whole: a resume loads the base and the
    adapter as for every LoRA run, then the head as the step folder's (merged) weights hold it."""

    def load(self, model: nn.Module, step_dir: Path) -> None:
        super().load(model, step_dir)
        stored = checkpoint_tensors(step_dir)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith("classifier."):
                    param.copy_(stored[name])


# ---------------------------------------------------------------- a finished run's labels


@dataclass
class LabelRun:
    """What `eval --examples` and `slmforge classify` need of a classify / tag run."""

    task: str
    labels: list[str]
    settings: Any
    """The run's ExamplesConfig (field names)."""
    encoder: LabelEncoder
    pad_id: int
    seq_len: int


def label_run(run) -> LabelRun:
    """A run (runs.Run) made by a classify / tag fine-tune, or an imported classification model."""
    from slmforge.finetune.config import ExamplesConfig

    cfg = run.model.cfg
    if not getattr(cfg, "has_classifier", False):
        raise SlmforgeError(f"{run.step_dir}: this model has no classification head (a {cfg.family} "
                            f"{family(cfg).kind}); fine-tune one with finetune.task = \"classify\" or \"tag\"")
    recorded = run.info.config_section("finetune")
    fields = {k: v for k, v in (recorded or {}).items() if k in ("text_field", "text_pair_field", "label_field",
                                                                   "tokens_field", "tags_field", "on_bad_example")}
    settings = config_io.from_dict(ExamplesConfig, {**fields, "task": cfg.head, "train_files": ["-"]}, "finetune")
    tokenizer = run.tokenizer()
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else cfg.pad_token_id
    encoder = LabelEncoder(tokenizer, cfg.head, cfg.labels, token_types=cfg.type_vocab_size > 1)
    return LabelRun(cfg.head, list(cfg.labels), settings, encoder, pad,
                    run.info.seq_len or cfg.max_seq_len)


def evaluate_label_file(run, path: str, batch_size: int) -> dict[str, Any]:
    """`slmforge eval RUN --examples FILE` for classify / tag runs: the loss and accuracy of FILE's
    labels, plus accuracy / macro-F1 (classify) or entity precision / recall / F1 (tag), per label."""
    from slmforge.objectives import mean_loss, summarize

    spec = label_run(run)
    skipped = Skipped()
    examples = encode_labeled(read_labeled([path], spec.settings, spec.task, skipped), spec.encoder,
                              spec.seq_len, spec.settings.on_bad_example, skipped, "the run's seq_len")
    if not examples:
        raise SlmforgeError(f"{path}: no usable examples ({skipped.summary() or 'empty'})")
    loader = LabelLoader(examples, batch_size, pad_id=spec.pad_id, shuffle=False, training=False)
    means, count = mean_loss(run.model, Classification(spec.task), loader.epoch_batches(), run.device)
    report = score(examples, predict(run.model, examples, spec.pad_id, batch_size), spec.labels)
    return {**summarize(means, None), "tokens": count, **report, "examples_file": path, "skipped": skipped.total}


def predict_lines(run, path: str, batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """`slmforge classify`: one prediction per non-blank input line, in order, with its line number (and,
    for plain text, the text). JSONL lines give the run's text
    (and pair) or words field; other files are plain text, a text per line (tag: words split on
    whitespace). A text longer than the context is cut to fit (said once); a word list too long fails."""
    spec = label_run(run)
    jsonl = any(path.endswith(suffix) for suffix in (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst"))
    examples: list[LabeledExample] = []
    numbers: list[int] = []  # each prediction names its input line: blank lines are skipped
    for number, text in read_lines(Path(path)):
        where = f"{path}:{number}"
        numbers.append(number)
        if jsonl:
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise BadExample("not an object", f"expected a JSON object, got {type(record).__name__}")
                examples.append(parse_labeled(record, spec.settings, where, spec.task, labeled=False))
            except json.JSONDecodeError as e:
                raise SlmforgeError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            except BadExample as e:
                raise SlmforgeError(f"{where}: {e}") from None
        elif spec.task == "tag":
            examples.append(LabeledExample(where, words=text.split()))
        else:
            examples.append(LabeledExample(where, text=text.rstrip("\r\n")))
    cut = 0
    for start in range(0, len(examples), 256):
        chunk = examples[start:start + 256]
        encoded = []
        for example in chunk:
            try:
                item = spec.encoder.encode(example, spec.seq_len)
            except BadExample as e:
                if spec.task == "tag" or e.reason != "too long":
                    raise SlmforgeError(f"{example.where}: {e} (the run's seq_len is {spec.seq_len})") from None
                item = spec.encoder.encode(example, spec.seq_len, truncate=True)
                cut += 1
            encoded.append(item)
        lines = numbers[start:start + 256]
        for line, example, probs in zip(lines, chunk, predict(run.model, encoded, spec.pad_id, batch_size)):
            if spec.task == "tag":
                best = probs.argmax(-1)
                yield {"line": line, "tokens": example.words, "tags": [spec.labels[i] for i in best],
                       "scores": [round(float(p[i]), 6) for p, i in zip(probs, best)]}
            else:
                best = int(probs.argmax())
                shown = {} if jsonl else {"text": example.text}
                yield {"line": line, **shown, "label": spec.labels[best], "score": round(float(probs[best]), 6),
                       "scores": {label: round(float(p), 6) for label, p in zip(spec.labels, probs)}}
    if cut:
        say(f"note: {cut} text(s) longer than the run's seq_len ({spec.seq_len} tokens) were cut to fit")
