"""Fine-tuning examples from JSONL: chat (prompt/response pairs or role/content messages),
fill-in-the-middle (prefix, suffix, middle) or translation pairs (source, target). A bad line names
its file and line; with on_bad_example = "skip" it is counted by reason instead, and the counts are
reported."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from slmforge.errors import SlmforgeError
from slmforge.finetune.config import ExamplesConfig
from slmforge.text.sources import numbered_lines

ROLES = ("system", "user", "assistant")

T = TypeVar("T")


@dataclass
class Example:
    where: str
    """file:line, for messages about this example."""
    messages: list[dict[str, str]] | None = None
    """chat: [{"role": "user" | "assistant" | "system", "content": ...}, ...]"""
    fim: tuple[str, str, str] | None = None
    """fill-in-the-middle: (prefix, suffix, middle)"""
    pair: tuple[str, str] | None = None
    """translate: (source, target); `messages` holds the same as a prompt/answer turn for decoders"""


class BadExample(ValueError):
    """An example that cannot be used; `reason` is a short category for the skip report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Skipped:
    """Examples left out (on_bad_example = "skip"), by reason, with the first place of each."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{n} {reason} (first: {self.first[reason]})" for reason, n in self.counts.most_common())


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file, plain or .gz/.zst; a non-UTF-8 line is one clear error."""
    for number, line in numbered_lines(path, "example file"):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SlmforgeError(f"{path}:{number}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
        if text.strip():
            yield number, text


def read_examples(paths: list[str], cfg: ExamplesConfig, skipped: Skipped) -> list[Example]:
    """Every usable example of `paths`, in file and line order."""
    return read_records(paths, cfg.on_bad_example, skipped, lambda record, where: parse_example(record, cfg, where))


def read_records(paths: list[str], on_bad: str, skipped: Skipped, parse: Callable[[dict, str], T]) -> list[T]:
    """`parse(record, "file:line")` of every JSON object line of `paths`, in file and line order; a bad
    line (invalid JSON, not an object, or a BadExample from `parse`) fails or is counted, per `on_bad`."""
    out: list[T] = []
    for name in paths:
        path = Path(name)
        lines = 0
        for number, text in read_lines(path):
            lines += 1
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise BadExample("not an object", f"expected a JSON object, got {type(record).__name__}")
                out.append(parse(record, where))
            except json.JSONDecodeError as e:
                bad_example(on_bad, skipped, where, "invalid JSON", f"invalid JSON ({e.msg}, column {e.colno})")
            except BadExample as e:
                bad_example(on_bad, skipped, where, e.reason, str(e))
        if lines == 0:
            raise SlmforgeError(f"{path}: no examples in this file (empty)")
    return out


def bad_example(on_bad: str, skipped: Skipped, where: str, reason: str, detail: str) -> None:
    """finetune.on_bad_example: "error" stops at the first bad line, "skip" counts it by reason."""
    if on_bad == "error":
        raise SlmforgeError(f"{where}: {detail} (finetune.on_bad_example = \"skip\" leaves such lines out)")
    skipped.add(reason, where, detail)


def parse_example(record: dict, cfg: ExamplesConfig, where: str) -> Example:
    if cfg.task == "translate":
        source, target = _text_field(record, cfg.src_field), _text_field(record, cfg.tgt_field)
        for name, text in ((cfg.src_field, source), (cfg.tgt_field, target)):
            if not text.strip():
                raise BadExample("empty side", f"field {name!r} is empty: not a translation pair")
        prompt = cfg.translate_prompt.replace("{src}", source)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
        return Example(where, messages=messages, pair=(source, target))
    if cfg.task == "fim":
        parts = tuple(_text_field(record, name) for name in (cfg.prefix_field, cfg.suffix_field, cfg.middle_field))
        if not parts[2].strip():
            raise BadExample("empty middle", f"field {cfg.middle_field!r} is empty: nothing to learn")
        return Example(where, fim=parts)
    use_messages = cfg.format == "messages" or (cfg.format == "auto" and cfg.messages_field in record)
    messages = _messages(record, cfg) if use_messages else _prompt_response(record, cfg)
    system = record.get(cfg.system_field) if cfg.system_field else None
    system = system if isinstance(system, str) and system else cfg.system_prompt
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return Example(where, messages=messages)


def _text_field(record: dict, name: str) -> str:
    if name not in record:
        raise BadExample("missing field", f"no field {name!r} (fields: {', '.join(map(repr, record)) or 'none'})")
    value = record[name]
    if not isinstance(value, str):
        raise BadExample("field not text", f"field {name!r} is {type(value).__name__}, expected text")
    return value


def _prompt_response(record: dict, cfg: ExamplesConfig) -> list[dict[str, str]]:
    prompt = _text_field(record, cfg.prompt_field)
    response = _text_field(record, cfg.response_field)
    if not response.strip():
        raise BadExample("empty response", f"field {cfg.response_field!r} is empty: nothing to learn")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _messages(record: dict, cfg: ExamplesConfig) -> list[dict[str, str]]:
    value = record.get(cfg.messages_field)
    if not isinstance(value, list) or not value:
        raise BadExample("missing field", f"field {cfg.messages_field!r} must be a non-empty list of "
                                          f"{{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise BadExample("bad message", f"{cfg.messages_field}[{i}] must be {{\"role\": one of "
                                            f"{'/'.join(ROLES)}, \"content\": text}}")
        messages.append({"role": message["role"], "content": message["content"]})
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise BadExample("no assistant message", "no assistant message: nothing to learn")
    if not any(m["content"].strip() for m in answers):
        raise BadExample("empty response", "every assistant message is empty: nothing to learn")
    if messages[-1]["role"] != "assistant":  # a trailing turn would be text nobody answers
        raise BadExample("ends without an answer", "the last message is not the assistant's")
    return messages
