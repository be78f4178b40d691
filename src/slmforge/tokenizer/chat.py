"""Chat templates as `transformers` renders them (`apply_chat_template`): a Jinja template in a
sandboxed environment with trim_blocks and lstrip_blocks, the tokenizer's special tokens as variables
(bos_token, eos_token, ...), `raise_exception` and a `tojson` filter. The template text travels with
the tokenizer (tokenizer_config.json's `chat_template`), so the ids slmforge trains on are the ids
transformers gives for the exported tokenizer."""

from __future__ import annotations

import json

from slmforge.errors import SlmforgeError


class ChatTemplateError(ValueError):
    """The template refused a conversation, or renders it in a way responses cannot be located."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - torch depends on jinja2
            raise SlmforgeError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(format: str) -> str:
            import datetime

            return datetime.datetime.now().strftime(format)

        env.filters["tojson"] = tojson  # transformers' filter and globals, with their arguments
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise SlmforgeError(f"finetune.chat_template: not a valid Jinja template ({e})") from None
        self.special_tokens = special_tokens
        self._error = TemplateError

    @classmethod
    def for_tokenizer(cls, source: str, tokenizer) -> "ChatTemplate":
        """The template with `tokenizer`'s special tokens as its variables (bos_token, eos_token, ...)."""
        return cls(source, {f"{role}_token": token for role, token in tokenizer.roles.items() if token is not None})

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except self._error as e:
            raise ChatTemplateError("template error", f"the chat template refused this conversation ({e})") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:  # a template reading a field the data lacks
            raise ChatTemplateError("template error", f"the chat template failed on this conversation "
                                                      f"({type(e).__name__}: {e})") from None

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
        return ChatTemplate.for_tokenizer(source, tokenizer).render(messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise SlmforgeError(f"--chat: {e}") from None
