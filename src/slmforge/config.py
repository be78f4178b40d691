"""Typed configs: dataclasses filled from TOML plus `section.field=value` overrides.

Every config section is a plain dataclass. Field documentation is the string literal placed right
under a field (an attribute docstring, as in litgpt); `describe()` turns those into `--help` text.
A section may define `validate(self)` that raises `ConfigError("field: why")`; the loader prefixes
the section path, so the user sees e.g. `model.num_kv_heads: must divide num_heads (4), got 3`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import sys
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

import tomli_w

from slmforge.errors import ConfigError

T = TypeVar("T")

# The largest float32: float fields reach torch (learning rates, ratios, scales), where a larger value
# overflows ("value cannot be converted to type float without overflow") instead of meaning anything.
FLOAT32_MAX = 3.4028234663852886e38


def require(condition: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming `field` unless `condition` holds (used inside `validate`)."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


# ---------------------------------------------------------------- dict -> dataclass


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking names, types and values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    expand = getattr(cls, "expand_config", None)
    if expand is not None:  # e.g. DecoderConfig turns `preset = "x"` into the preset's fields
        try:
            data = expand(data)
        except ConfigError as e:
            raise ConfigError(f"{where}.{e}" if where else str(e)) from None
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        allowed = ", ".join(fields)
        hint = did_you_mean(unknown[0], list(fields), lambda close: _join(where, close))
        raise ConfigError(f"{_join(where, unknown[0])}: unknown field; {hint}allowed: {allowed}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    obj = cls(**kwargs)
    validate(obj, where)
    return obj


def parse(tp: Any, value: Any, where: str = "") -> Any:
    """`value` (e.g. a table from a file) as type `tp`, which may be a tagged union such as the
    [model] section's `DecoderConfig | EncoderConfig`; errors name the field under `where`."""
    return _coerce(tp, value, where)


def validate(obj: Any, where: str = "") -> None:
    """Run `validate()` on `obj` and on every nested section, prefixing errors with their path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, _join(where, f.name))
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


@lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe_type(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_describe_type(get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _is_tagged_union(options: list[Any]) -> bool:
    """A union of dataclasses that each name a tag field (`TAG = "family"`), e.g. decoder | encoder."""
    return all(dataclasses.is_dataclass(o) and getattr(o, "TAG", None) for o in options)


def _tag_values(option: Any) -> tuple[Any, ...]:
    return get_args(_type_hints(option)[option.TAG])


def _tagged_member(options: list[Any], value: Any, where: str) -> Any:
    """The member whose tag field (a Literal) admits the table's tag value (a `tag_of` hook may derive
    it, e.g. from a preset); a table without one gets the first member's default."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    first = options[0]
    tag_of = getattr(first, "tag_of", None)
    tag = tag_of(value) if tag_of else value.get(first.TAG, getattr(first(), first.TAG))
    for option in options:
        if tag in _tag_values(option):
            return option
    allowed = " | ".join(repr(v) for o in options for v in _tag_values(o))
    raise ConfigError(f"{_join(where, first.TAG)}: must be one of {allowed}, got {tag!r}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # `X | None`: X's own error names the inner field
            return _coerce(real[0], value, where)
        if _is_tagged_union(real):
            return from_dict(_tagged_member(real, value, where), value, where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: must be one of {_describe_type(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, item = get_args(tp)
        return {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(value, where)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:  # pragma: no cover - a developer error, not a user one
        raise TypeError(f"{where}: unsupported config type {tp!r}")
    raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {value!r}")


def _finite(value: int | float, where: str) -> float:
    """Every float field, whatever its section: inf and nan (which TOML spells) are refused, and so are
    magnitudes float32 cannot hold (torch overflows on them mid-run, e.g. in the optimizer step)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:  # compared before float(): an integer may exceed any float
        shown = repr(value) if isinstance(value, float) or len(str(value)) <= 24 else f"{len(str(value))} digits"
        raise ConfigError(f"{where}: out of range (float32 holds magnitudes up to {FLOAT32_MAX:.4g}), "
                          f"got {shown}")
    return float(value)


# ---------------------------------------------------------------- overrides and files


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3). The value is read as TOML; a bare word stays a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # e.g. `model.preset=gemma3-270m`, `train.out_dir=runs/x`
    return key.split("."), value


# Fields of which a run uses one: a value given on the command line wins over the other one set in
# the file (a recipe's `epochs = 3` would otherwise overrule `train.max_steps=200`, which is how a user
# asks for a short run), and the command line says so once.
SUPERSEDES = {("train", "max_steps"): ("train", "epochs"),
              ("schedule", "warmup_steps"): ("schedule", "warmup_ratio")}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override set."""
    data = _deep_copy(data)
    given = set()
    for text in overrides:
        path, value = parse_override(text)
        given.add(tuple(path))
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    for field, other in SUPERSEDES.items():
        section = data.get(other[0])
        if field in given and other not in given and isinstance(section, dict) and other[1] in section:
            dropped = section.pop(other[1])
            from slmforge.formatting import say

            say(f"note: {'.'.join(field)} on the command line replaces the file's "
                f"{'.'.join(other)} = {dropped!r}")
    return data


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


# Every section a recipe file may hold, over all verbs ([tokenizer]: tokenizer train, [data]: data
# prepare, [curate]: data curate, [pairs]: data pairs, [finetune] [lora]: finetune, [distill]: distill,
# the rest: pretrain and the training verbs). A verb reads its own and skips the others, so a misspelled
# one (`[trian]`) would be skipped silently without this list; tests keep it equal to the config classes.
RECIPE_SECTIONS = ("tokenizer", "data", "curate", "pairs", "model", "objective", "optim", "schedule", "train",
                   "tracking", "parallel", "finetune", "lora", "distill")


def did_you_mean(name: str, known: list[str], show=lambda close: close) -> str:
    """`did you mean X? ` for the known name closest to a misspelled one (`trian` -> train), shown
    through `show`; "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {show(close[0])}? " if close else ""


def check_sections(tree: dict[str, Any], path: str | Path) -> None:
    """Refuse a top-level key of a recipe file that is no verb's section, naming the likely one."""
    for key in tree:
        if key not in RECIPE_SECTIONS:
            hint = did_you_mean(key, list(RECIPE_SECTIONS), lambda close: f"[{close}]")
            raise ConfigError(f"{path}: [{key}]: unknown section; {hint}known: {', '.join(RECIPE_SECTIONS)}")


def _file_prefix(path: str | Path | None, error: ConfigError, overrides: list[str] | None) -> str:
    """`error` prefixed with the config file's name, unless the field it names came from a
    command-line override (then the file is not at fault)."""
    field = str(error).split(":", 1)[0].strip()
    for text in overrides or []:
        key = text.split("=", 1)[0].strip()
        if field == key or field.startswith((key + ".", key + "[")) or key.startswith(field + "."):
            return str(error)
    return f"{path}: {error}" if path is not None else str(error)


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict[str, Any] | None = None) -> T:
    """Build `cls` from defaults <- `base` <- TOML file <- overrides (later wins)."""
    data = _deep_copy(base or {})
    if path is not None:
        data = _merge(data, read_toml(path))
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(_file_prefix(path, e, overrides)) from None


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """A training verb's config from a recipe file and overrides; a misspelled section ([trian]) is
    named with the one probably meant."""
    if path is not None:
        check_sections(read_toml(path), path)
    return load(cls, path, overrides)


def load_section(cls: type[T], section: str, path: str | Path | None = None,
                 overrides: list[str] | None = None, flags: dict[str, Any] | None = None) -> T:
    """One section of a recipe file (e.g. `[tokenizer]`), then `flags`, then `section.field=value`
    overrides. Other sections of the file belong to other verbs and are ignored; an override for
    another section is an error, since it would have no effect."""
    tree = read_toml(path) if path is not None else {}
    if path is not None:
        check_sections(tree, path)
    data = {**tree.get(section, {}), **(flags or {})}
    for text in overrides or []:
        key = text.split("=", 1)[0].strip()
        if not key.startswith(section + "."):
            head, dot, rest = text.partition(".")
            hint = did_you_mean(head, [section], lambda close: f"{close}.{rest}") if dot else ""
            example = f"e.g. {section}.{next(iter(field_docs(cls)), 'field')}=..."
            raise ConfigError(f"override {text!r}: only {section}.* fields apply here ({hint.strip() or example})")
    data = apply_overrides({section: data}, overrides or [])[section]
    try:
        return from_dict(cls, data, section)
    except ConfigError as e:
        raise ConfigError(_file_prefix(path, e, overrides)) from None


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-ready dict (paths as strings, None fields left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif value is None:
            continue  # TOML has no null; an absent field means "default", which is None
        elif isinstance(value, Path):
            out[f.name] = str(value)
        elif isinstance(value, (list, tuple)):
            out[f.name] = [to_dict(v) if dataclasses.is_dataclass(v) else str(v) if isinstance(v, Path) else v
                           for v in value]
        else:
            out[f.name] = value
    return out


def dumps(obj: Any) -> str:
    return tomli_w.dumps(to_dict(obj))


def save(obj: Any, path: str | Path) -> None:
    """Write atomically: a crash mid-write never leaves a torn config.toml."""
    from slmforge.fileio import write_text_atomic

    write_text_atomic(path, dumps(obj))


# ---------------------------------------------------------------- help text


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field, `section.field (type, default X): doc`, recursing into sections."""
    lines: list[str] = []
    hints = _type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, name))
            continue
        members = [o for o in get_args(tp) if o is not type(None)]
        if members and _is_tagged_union(members):
            for member in members:
                tags = " | ".join(repr(v) for v in _tag_values(member))
                lines.append(f"  [{name}] with {member.TAG} = {tags}:")
                lines.extend(describe(member, name))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        lines.append(f"  {name} ({_describe_type(tp)}, default {default!r}): {docs.get(f.name, '')}")
    return lines
