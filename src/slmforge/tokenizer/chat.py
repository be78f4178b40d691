"""Chat templates as `transformers` renders them (`apply_chat_template`): a Jinja template in a
sandboxed environment with trim_blocks and lstrip_blocks, the tokenizer's special tokens as variables
(bos_token, eos_token, ...), `raise_exception` and a `tojson` filter. The template text travels with
the tokenizer (tokenizer_config.json's `chat_template`), so the ids slmforge trains on are the ids
transformers gives for the exported tokenizer."""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from typing import Any

from slmforge.errors import SlmforgeError

# A template is code that runs on every example: a broken or hostile one (`{{ 'a' * 10**11 }}`, nested
# `range(100000)` loops, a macro that calls itself twice) must stop with one line, not exhaust memory or
# hang. Each render gets a budget of characters, RENDER_CHARS plus RENDER_CHARS_PER_INPUT times the
# conversation's own text: every string, list or number the template builds is paid for by its size
# (checked before the allocation where its size can be known in advance: repetition, concatenation,
# powers, padding, replace, formatting, joins), every loop step, call, filter and printed value costs
# at least 1, and all of it must finish within RENDER_SECONDS. Real chat templates use a few times the
# conversation's size and well under a millisecond.
RENDER_CHARS = 32_000_000
RENDER_CHARS_PER_INPUT = 16
RENDER_SECONDS = 10.0


class ChatTemplateError(ValueError):
    """The template refused a conversation, or renders it in a way responses cannot be located."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class ChatTemplateLimit(SlmforgeError):
    """The template needs more memory or time than any chat template should: a fault of the template,
    not of one conversation, so it stops the command (it is never skipped as a bad example)."""


class _Exceeded(Exception):
    """Raised inside a render when its budget runs out; `render` turns it into ChatTemplateLimit."""


class _Budget:
    __slots__ = ("total", "left", "seconds", "deadline")

    def __init__(self, chars: int, seconds: float):
        self.total, self.left, self.seconds = chars, chars, seconds
        self.deadline = time.monotonic() + seconds

    def afford(self, cost: int, what: str) -> None:
        """Refuse an allocation of `cost` characters (or items) before it is made."""
        if cost > self.left:
            raise _Exceeded(f"{what} would build more than the {self.left:,} characters left of the "
                            f"{self.total:,} a render may use")

    def charge(self, cost: int, what: str) -> None:
        self.left -= cost + 1  # + 1: every step costs something, so an empty loop runs out too
        if self.left < 0:
            raise _Exceeded(f"{what}: the render used more than its {self.total:,} characters")
        if time.monotonic() > self.deadline:
            raise _Exceeded(f"the render ran longer than {self.seconds:g} s (a loop that never ends?)")


_budget: ContextVar[_Budget | None] = ContextVar("slmforge_chat_template_budget", default=None)


def _afford(cost: int, what: str) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.afford(cost, what)


def _charge(cost: int, what: str) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.charge(cost, what)


def _cost(value: Any) -> int:
    """What holding `value` costs: its length for strings and containers, its bytes for integers."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value.bit_length() // 8
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    return 0


def _widest(values) -> int:
    """The largest integer among `values`: a width, count or length an operation may allocate."""
    return max((abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool)), default=0)


_DIGITS = re.compile(r"\d+")


def _format_cost(fmt: str, values) -> int:
    """An upper estimate of `fmt % values` / `fmt.format(...)`: the text, the arguments and the widest
    field (a width written in the format, `%0100000000000d`, or passed as an argument, `%*d`)."""
    values = list(values)
    for value in list(values):
        if isinstance(value, dict):
            values.extend(value.values())
        elif isinstance(value, (list, tuple)):
            values.extend(value)
    widths = [int(d) if len(d) <= 18 else 10 ** 18 for d in _DIGITS.findall(fmt)]
    return len(fmt) + sum(_cost(v) for v in values) + max(widths + [_widest(values)])


def _replace_cost(text: str, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _method_cost(obj: Any, values: tuple) -> int:
    """An upper estimate of what calling `obj` builds, for the methods that can build far more than
    they are given (padding, expandtabs, replace, join, to_bytes); other calls: their widest integer."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if isinstance(owner, str):
        if name == "expandtabs":
            return len(owner) * max(1, _widest(values) or 8)
        if name == "replace" and len(values) >= 2:
            return _replace_cost(owner, *values[:3])
        if name == "join" and values and isinstance(values[0], (list, tuple)):
            return sum(_cost(v) for v in values[0]) + len(owner) * len(values[0])
        return len(owner) + _widest(values)
    return _cost(owner) + _widest(values)


def _filter_cost(name: str, value: Any, values: tuple) -> int:
    if name == "replace" and isinstance(value, str) and len(values) >= 2:
        return _replace_cost(value, *values[:3])
    if name == "format" and isinstance(value, str):
        return _format_cost(value, values)
    if name == "indent" and isinstance(value, str):
        width = values[0] if values else 4
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * max(0, width)
    if name == "join" and isinstance(value, (list, tuple)):
        separator = values[0] if values and isinstance(values[0], str) else ""
        return sum(_cost(v) for v in value) + len(separator) * len(value)
    return _cost(value) + _widest(values) + sum(len(v) for v in values if isinstance(v, str))


def _environment():
    """The sandbox chat templates render in: transformers' (immutable sandbox, trim_blocks,
    lstrip_blocks, loop controls) with every loop step, printed value, call, filter and string-building
    operator metered against the render's budget."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.runtime import Macro
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import generate_lorem_ipsum, pass_context
    from jinja2.visitor import NodeTransformer

    LOOP, OUT, JOIN = "_slmforge_loop", "_slmforge_out", "_slmforge_join"

    def wrap(node, name: str):
        wrapped = nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)
        return wrapped.set_environment(node.environment) if getattr(node, "environment", None) else wrapped

    class Meter(NodeTransformer):
        """Every loop's iterable, printed value and `~` concatenation goes through a metering filter."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = wrap(node.iter, LOOP)
            return node

        def visit_Output(self, node):
            node = self.generic_visit(node)
            node.nodes = [wrap(child, OUT) for child in node.nodes]
            return node

        def visit_Concat(self, node):
            return wrap(self.generic_visit(node), JOIN)

    class MeteredCodeGenerator(CodeGenerator):
        def visit_Template(self, node, frame=None):
            Meter().visit(node)
            super().visit_Template(node, frame)

    @pass_context
    def metered_loop(context, iterable):
        for item in iterable:
            _charge(0, "a loop")
            yield item

    @pass_context
    def metered_output(context, value):
        text = value if isinstance(value, str) else str(value)
        _charge(len(text), "the rendered text")
        return text

    @pass_context
    def metered_join(context, value):
        _charge(_cost(value), "a ~ concatenation")
        return value

    def metered_filter(name: str, func):
        passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

        @pass_context
        def filter(context, value, *args, **kwargs):
            _afford(_filter_cost(name, value, (*args, *kwargs.values())), f"the {name} filter")
            lead = {"context": (context,), "eval_context": (context.eval_ctx,),
                    "environment": (context.environment,)}.get(passes, ())
            result = func(*lead, value, *args, **kwargs)
            _charge(_cost(result), f"the {name} filter")
            return result

        return filter

    def lipsum(n=5, html=True, min=20, max=100):
        _afford(_widest([n]) * _widest([max]) * 16, "lipsum")
        return generate_lorem_ipsum(n, html, min, max)

    class MeteredSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})
        code_generator_class = MeteredCodeGenerator

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.globals["lipsum"] = lipsum

        def call_binop(self, context, operator, left, right):
            cost = 0
            numbers = isinstance(left, int) and isinstance(right, int)
            if operator == "*":
                if numbers:  # big-integer products take time well beyond their size: paid as its square
                    cost = (_cost(left) + _cost(right)) ** 2
                elif isinstance(right, int):
                    cost = _cost(left) * max(right, 0)
                elif isinstance(left, int):
                    cost = _cost(right) * max(left, 0)
            elif operator == "**":
                if numbers and right > 0 and abs(left) > 1:
                    cost = (right * abs(left).bit_length() // 8) ** 2
            elif operator == "+":
                cost = _cost(left) + _cost(right)
            elif operator == "%" and isinstance(left, str):
                cost = _format_cost(left, right if isinstance(right, (tuple, dict)) else (right,))
            _afford(cost, f"the {operator} operator")
            result = super().call_binop(context, operator, left, right)
            _charge(_cost(result), f"the {operator} operator")
            return result

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
            if not isinstance(__obj, Macro):  # a macro's own steps are metered inside it
                _afford(_method_cost(__obj, (*args, *kwargs.values())), "a call")
            _charge(0, "a call")
            result = super().call(__context, __obj, *args, **kwargs)
            _charge(_cost(result), "a call")
            return result

        def getattr(self, obj, attribute):
            _charge(0, "an attribute")
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _charge(0, "an item")
            return super().getitem(obj, argument)

        def wrap_str_format(self, value):
            formatter = super().wrap_str_format(value)
            if formatter is None:
                return None
            text = value.__self__

            def format(*args, **kwargs):
                _afford(_format_cost(text, (*args, *kwargs.values())), "format")
                result = formatter(*args, **kwargs)
                _charge(len(result), "format")
                return result

            return format

    env = MeteredSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        pieces = []
        encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                   sort_keys=sort_keys)
        for piece in encoder.iterencode(value):  # paid piece by piece: indent can multiply the text
            _charge(len(piece), "tojson")
            pieces.append(piece)
        return "".join(pieces)

    env.filters["tojson"] = tojson  # transformers' filter and globals, with their arguments
    env.filters.update({name: metered_filter(name, func) for name, func in env.filters.items()})
    env.filters.update({LOOP: metered_loop, OUT: metered_output, JOIN: metered_join})
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], name: str = "finetune.chat_template"):
        try:
            from jinja2.exceptions import TemplateError
        except ImportError:  # pragma: no cover - torch depends on jinja2
            raise SlmforgeError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message: str):
            raise TemplateError(message)

        self.name = name
        env = _environment()

        def strftime_now(format: str) -> str:
            import datetime

            return datetime.datetime.now().strftime(format)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise SlmforgeError(f"{name}: not a valid Jinja template ({e})") from None
        except RecursionError:
            raise SlmforgeError(f"{name}: not a valid Jinja template (nested too deeply)") from None
        self.special_tokens = special_tokens
        self._error = TemplateError

    @classmethod
    def for_tokenizer(cls, source: str, tokenizer, name: str = "finetune.chat_template") -> "ChatTemplate":
        """The template with `tokenizer`'s special tokens as its variables (bos_token, eos_token, ...)."""
        return cls(source, {f"{role}_token": token for role, token in tokenizer.roles.items() if token is not None},
                   name)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text; ChatTemplateError when the template refuses or fails on it,
        ChatTemplateLimit when it needs more than its budget (see RENDER_CHARS)."""
        given = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
        given += sum(len(v) for v in self.special_tokens.values())
        budget = _Budget(RENDER_CHARS + RENDER_CHARS_PER_INPUT * given, RENDER_SECONDS)
        token = _budget.set(budget)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except _Exceeded as e:
            raise ChatTemplateLimit(f"{self.name}: rendering stopped: {e}; a chat template should need about "
                                    f"the size of the conversation") from None
        except self._error as e:
            raise ChatTemplateError("template error", f"the chat template refused this conversation ({e})") from None
        except Exception as e:  # a template reading a field the data lacks, dividing by zero, recursing
            raise ChatTemplateError("template error", f"the chat template failed on this conversation "
                                                      f"({type(e).__name__}: {_one_line(e)})") from None
        finally:
            _budget.reset(token)

    def response_spans(self, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
        """Character spans of render(messages) that each assistant turn adds (its content and the
        template's end-of-turn text): what the loss is computed on."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ChatTemplateError("template not prefix-stable",
                                        "the chat template renders a conversation prefix differently from the "
                                        "whole conversation, so the response tokens cannot be located")
            spans.append((len(before), len(through)))
        return spans


def tokenizer_chat_template(tokenizer) -> str | None:
    """The chat template a tokenizer carries (from fine-tuning, or imported with it), if any."""
    return tokenizer.meta.get("hf_settings", {}).get("chat_template")


def chat_prompt(tokenizer, text: str, system: str = "") -> str:
    """`text` as a user turn, rendered with the tokenizer's template up to the assistant's answer."""
    source = tokenizer_chat_template(tokenizer)
    if not source:
        raise SlmforgeError("--chat: this run's tokenizer has no chat template (fine-tune with `slmforge "
                            "finetune` first, or leave out --chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    try:
        text = ChatTemplate.for_tokenizer(source, tokenizer, "the run's chat template").render(
            messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise SlmforgeError(f"--chat: {e}") from None
    if not text.strip():  # nothing for the model to continue from (generation would fail on no tokens)
        raise SlmforgeError(f"--chat: the run's chat template renders this turn as empty text ({text!r}), so the "
                            f"model has nothing to answer; the template must write user messages and the "
                            f"generation prompt")
    return text


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
