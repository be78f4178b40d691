"""PromptFormat: how a run's model wants its prompts laid out, read from the run in one place.

A pretrained run says whether its documents began with bos (`add_bos` in meta.json); a fine-tuned chat
run carries a chat template (in its tokenizer) and the token that ends an answer (meta.json
`finetune.stop_token`). `prompt_format(run)` is the only reader of those keys (through `run.info`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmforge.errors import SlmforgeError


@dataclass(frozen=True)
class PromptFormat:
    tokenizer: Any
    """The run's tokenizer (slmforge.tokenizer.Tokenizer)."""
    add_bos: bool = True
    """Put bos before a plain prompt (as the training documents began)."""
    source_eos: bool = False
    """End a prompt with eos: an encoder-decoder's source, as span corruption laid it out."""
    chat_template: str | None = None
    """The Jinja chat template (from fine-tuning, or imported with the tokenizer)."""
    end_of_turn: str | None = None
    """The token a fine-tuned chat run ends its answer with."""

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """The tokens that end a generation: the end-of-turn token of a chat run, and eos."""
        ids = []
        if self.end_of_turn is not None and self.tokenizer.token_to_id(self.end_of_turn) is not None:
            ids.append(self.tokenizer.token_to_id(self.end_of_turn))
        if self.eos_id is not None and self.eos_id not in ids:
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str) -> list[int]:
        """A plain prompt as ids: bos first when the run trained with it (eos last for a source)."""
        ids = self.tokenizer.encode(text)
        if self.source_eos:
            ids = ids + ([self.eos_id] if self.eos_id is not None else [])
        elif self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if not ids:  # the model needs at least one token to continue from
            raise SlmforgeError(f"the prompt {text[:60]!r} encodes to no tokens and no bos token goes before it: "
                                f"nothing to generate from; give a prompt with text")
        return ids

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The conversation rendered with the run's chat template, up to the assistant's answer."""
        from slmforge.tokenizer.chat import ChatTemplate, ChatTemplateError

        if not self.chat_template:
            raise SlmforgeError("--chat: this run's tokenizer has no chat template (fine-tune with `slmforge "
                                "finetune` first, or leave out --chat)")
        try:
            text = ChatTemplate.for_tokenizer(self.chat_template, self.tokenizer, "the run's chat template").render(
                messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise SlmforgeError(f"--chat: {e}") from None
        if not text.strip():  # nothing for the model to continue from
            raise SlmforgeError(f"--chat: the run's chat template renders this turn as empty text ({text!r}), so "
                                f"the model has nothing to answer; the template must write user messages and the "
                                f"generation prompt")
        return text

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation ([{role, content}, ...]) as ids; the template places bos itself."""
        return self.tokenizer.encode(self.chat_text(messages))

    def user_turn(self, text: str, system: str = "") -> list[dict[str, str]]:
        """`text` as the user's message, after an optional system message."""
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def prompt_format(run, tokenizer=None) -> PromptFormat:
    """The prompt layout of an opened run (`reading.Run`): the one place its meta.json keys for
    prompting are read (`add_bos`, `finetune.stop_token`, through the run's CheckpointMeta). `tokenizer`: the run's, when the caller has already loaded it."""
    from slmforge.tokenizer.chat import tokenizer_chat_template

    tokenizer = tokenizer if tokenizer is not None else run.tokenizer()
    info = run.info  # the checkpoint's meta.json as a checked record (checkpoint_meta.CheckpointMeta)
    return PromptFormat(tokenizer=tokenizer, add_bos=info.add_bos, source_eos=run.kind == "encoder-decoder",
                        chat_template=tokenizer_chat_template(tokenizer),
                        end_of_turn=info.finetune.stop_token if info.finetune is not None else None)
