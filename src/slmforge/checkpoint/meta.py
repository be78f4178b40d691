"""A checkpoint's meta.json as a typed record: what training wrote about a step folder, read and
checked in one place, so no verb reads a key of it by hand.

meta.json is read from disk, so it is untrusted input: a field of the wrong type is one line naming
the file and the field here, not a crash deep inside eval or export. Every field may be absent (old
checkpoints, imported models and hand-made folders record less; null is the same as absent, but
for add_bos), and keys this record does not know
are kept in `extra`, so `to_json()` gives back what was read.

Who writes what (checkpoint/writing.py `step_meta` for every folder; the rest as `extra_meta`):

    step, model, slmforge_version                     every step folder
    hardware, versions, tokens_seen, wall_time_s      the trainer (runtime.describe, its counters)
    tokenizer_sha256, data, seq_len, add_bos,         pretrain (distill: also `distill`)
    objective, processes, config, data_fingerprint,
    resume_identity, dropout_seeds
    finetune (FinetuneMeta), role                     finetune (role: a LoRA run's base/ folder)
    imported_from / trimmed_from                      import-hf / trim-vocab
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.fileio import read_json
from slmforge.models.registry import ModelConfig, config_from_dict

META = "meta.json"

# What a field may hold: (accepted Python types, how the error names it). bool is no integer here.
_KINDS = {
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "object": ((dict,), "a JSON object"),
    "strings": ((list,), "a list of strings"),
    "ints": ((list,), "a list of integers"),
}


def _check(value: Any, kind: str, nullable: bool, where: Path, name: str) -> Any:
    """`value` if it is of `kind` (lists as tuples), else one SlmforgeError naming the file and field."""
    if value is None and nullable:
        return None
    types, wanted = _KINDS[kind]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and kind in ("strings", "ints"):
        item = str if kind == "strings" else int
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise SlmforgeError(f"{where}: {name} must be {wanted}{' or null' if nullable else ''}, "
                            f"got {type(value).__name__} {shown}")
    return tuple(value) if kind in ("strings", "ints") else value


def _parse(cls, raw: Any, where: Path, prefix: str) -> dict[str, Any]:
    """Keyword arguments for `cls` from a JSON object: each declared field checked by its `kind`
    metadata, unknown keys into `extra`, the keys read (in order) into `keys`."""
    if not isinstance(raw, dict):
        raise SlmforgeError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a JSON object, "
                            f"got {type(raw).__name__}")
    declared = {f.name: f for f in fields(cls) if "kind" in f.metadata}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        spec = declared.get(key)
        if spec is not None:
            values[key] = _check(value, spec.metadata["kind"], spec.metadata.get("nullable", False), where,
                                 prefix + key)
    values["extra"] = {k: v for k, v in raw.items() if k not in declared}
    values["keys"] = tuple(raw)
    return values


def _dump(record) -> dict[str, Any]:
    """The JSON object of a record: the keys it was read with, in their order (a record made in code:
    its fields that are set), then anything new in `extra`."""
    out: dict[str, Any] = {}
    declared = [f.name for f in fields(record) if "kind" in f.metadata]
    names = list(record.keys) if record.keys is not None else [n for n in declared
                                                               if getattr(record, n) is not None]
    for name in names:
        if name in declared:
            value = getattr(record, name)
            if isinstance(value, FinetuneMeta):
                value = value.to_json()
            out[name] = list(value) if isinstance(value, tuple) else value
        elif name in record.extra:
            out[name] = record.extra[name]
    out.update({k: v for k, v in record.extra.items() if k not in out})
    return out


def _field(kind: str, default: Any = None, nullable: bool = True, doc: str = ""):
    return field(default=default, metadata={"kind": kind, "nullable": nullable, "doc": doc})


@dataclass(frozen=True)
class FinetuneMeta:
    """meta.json `finetune`: what eval, generate, classify and export need of a fine-tuned checkpoint
    (finetune/run.py and finetune/classify.py `_meta` write it)."""

    task: str | None = _field("str", doc="chat, translate, infill, classify, tag, ...")
    chat_template: str | None = _field("str", doc="the template name fine-tuning used")
    stop_token: str | None = _field("str", doc="the token that ends an answer")
    lora: dict[str, Any] | None = _field("object", doc="the LoraConfig; null: every weight trained")
    examples: tuple[str, ...] | None = _field("strings", doc="the training example files")
    labels: tuple[str, ...] | None = _field("strings", doc="classify / tag: the label names")
    text_field: str | None = _field("str")
    text_pair_field: str | None = _field("str")
    label_field: str | None = _field("str")
    tokens_field: str | None = _field("str")
    tags_field: str | None = _field("str")
    extra: dict[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: Any, where: Path) -> FinetuneMeta:
        return cls(**_parse(cls, raw, where, "finetune."))

    def to_json(self) -> dict[str, Any]:
        return _dump(self)


@dataclass(frozen=True)
class CheckpointMeta:
    """A step folder's meta.json. `path` is the file it was read from (named by errors)."""

    step: int | None = _field("int")
    model: dict[str, Any] | None = _field("object", doc="the model config (model_config() builds it)")
    slmforge_version: str | None = _field("str")
    tokenizer_sha256: str | None = _field("str", doc="the tokenizer the model was trained with")
    data: str | None = _field("str", doc="the prepared data folder, relative to the run folder")
    seq_len: int | None = _field("int")
    add_bos: bool = _field("bool", default=True, nullable=False, doc="whether training put bos before each document")
    objective: dict[str, Any] | None = _field("object", doc="the ObjectiveConfig training used")
    processes: int | None = _field("int")
    config: dict[str, Any] | None = _field("object", doc="the resolved run config")
    data_fingerprint: str | None = _field("str")
    resume_identity: dict[str, Any] | None = _field("object")
    dropout_seeds: tuple[int, ...] | None = _field("ints")
    finetune: FinetuneMeta | None = _field("object")
    distill: dict[str, Any] | None = _field("object")
    hardware: dict[str, Any] | None = _field("object", doc="device, precision, processes, CPU, GPU")
    versions: dict[str, Any] | None = _field("object", doc="slmforge, torch, python, cuda")
    tokens_seen: int | None = _field("int")
    wall_time_s: float | None = _field("number", doc="time spent training, summed over every attempt")
    role: str | None = _field("str", doc="e.g. a LoRA run's base weights")
    imported_from: dict[str, Any] | None = _field("object")
    trimmed_from: dict[str, Any] | None = _field("object")
    # Kept for meta.json files written before these moved (wall_time_s, hardware.device).
    elapsed_s: float | None = _field("number")
    device: str | None = _field("str")
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this record does not know (an `extend_objective`'s, a newer slmforge's): kept, not lost."""
    keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, raw: Any, where: Path) -> CheckpointMeta:
        """The record of a parsed meta.json; `where` is the file, for errors."""
        values = _parse(cls, raw, where, "")
        if values.get("finetune") is not None:
            values["finetune"] = FinetuneMeta.from_json(values["finetune"], where)
        if values.get("objective") is not None:
            _check(values["objective"].get("kind"), "str", True, where, "objective.kind")
        if values.get("hardware") is not None:
            _check(values["hardware"].get("processes"), "int", True, where, "hardware.processes")
        return cls(**values, path=Path(where))

    @classmethod
    def read(cls, step_dir: Path) -> CheckpointMeta:
        """The meta.json of a step folder."""
        path = Path(step_dir) / META
        try:
            raw = read_json(path)
        except FileNotFoundError:
            raise SlmforgeError(f"{path}: missing; the checkpoint is incomplete") from None
        return cls.from_json(raw, path)

    def to_json(self) -> dict[str, Any]:
        """The JSON object this record was read from (same keys, same values); a copy, so changing
        it leaves the record as read."""
        return copy.deepcopy(_dump(self))

    # ------------------------------------------------------------ what readers ask of it

    def model_config(self) -> ModelConfig:
        """The model config as its family's config class."""
        if self.model is None:
            raise SlmforgeError(f"{self.path}: has no model config")
        try:
            return config_from_dict(self.model, "model")
        except (ConfigError, SlmforgeError) as e:
            raise SlmforgeError(f"{self.path}: {e}") from None

    @property
    def objective_kind(self) -> str | None:
        return (self.objective or {}).get("kind")

    @property
    def process_count(self) -> int | None:
        """Processes that trained this step: `processes`, or hardware.processes where only that was kept."""
        return self.processes if self.processes is not None else (self.hardware or {}).get("processes")

    @property
    def training_seconds(self) -> float | None:
        """Time spent training (wall_time_s; elapsed_s in older files)."""
        return self.wall_time_s if self.wall_time_s is not None else self.elapsed_s

    @property
    def stop_token(self) -> str | None:
        """The token that ends a fine-tuned model's answer (None: not fine-tuned, or none recorded)."""
        return self.finetune.stop_token if self.finetune is not None else None

    @property
    def lora(self) -> dict[str, Any] | None:
        """The LoRA settings of a LoRA fine-tune, or None."""
        return self.finetune.lora if self.finetune is not None else None

    def config_section(self, name: str) -> dict[str, Any] | None:
        """One section of the recorded run config (e.g. "finetune"), or None if it recorded none."""
        section = (self.config or {}).get(name)
        return section if isinstance(section, dict) else None
