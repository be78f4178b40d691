"""From an example to text with the spans that carry loss, and from text to ids.

Chat examples go through a Jinja chat template rendered as `transformers`' `apply_chat_template`
renders it (sandboxed environment, trim_blocks, lstrip_blocks, the tokenizer's special tokens as
variables), and the rendered text is tokenized whole, without added specials, as transformers does:
the ids a fine-tuned model sees are the ids `apply_chat_template` gives for the exported tokenizer.
The response spans are found by rendering each conversation prefix: the text added by an assistant
turn (its content and the template's end-of-turn marker) is what the loss is computed on.

Fill-in-the-middle examples are <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>,
with the loss on the middle and the eos.

Translation pairs for an encoder-decoder are two sequences, `source eos` for the encoder and `target
eos` for the decoder (the layout span corruption pretrained on and `slmforge translate` feeds); for a
decoder they are a chat turn (finetune.translate_prompt) answered by the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmforge.errors import SlmforgeError
from slmforge.finetune.examples import BadExample, Example, Skipped
from slmforge.tokenizer.chat import ChatTemplate, ChatTemplateError, ChatTemplateLimit

CHATML = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# No markers: the prompt, a newline, the response and eos (seed 000's prompt-masked pairs).
PLAIN = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'] + '\n' }}{%- endif %}"
    "{%- endfor %}"
)

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@dataclass
class Rendered:
    text: str
    scored: list[tuple[int, int]]
    """Character spans of `text` that carry loss (responses, or the middle)."""
    answer: str
    """The reference answer: the last assistant message, or the middle."""


@dataclass
class Encoded:
    ids: np.ndarray
    scored: np.ndarray
    """True where the token is a target (a response token)."""
    prompt_len: int
    """Tokens before the last answer: the generation prompt in evaluation."""
    answer: str
    where: str

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class EncodedPair:
    """A translation pair for an encoder-decoder: every target token carries loss."""

    source: np.ndarray
    """Source ids and eos: the encoder's input."""
    target: np.ndarray
    """Target ids and eos: what the decoder predicts (behind the decoder start token)."""
    prompt: str
    """The source text, for tables of samples."""
    answer: str
    """The reference translation."""
    where: str

    @property
    def length(self) -> int:
        """The longer side: each must fit the model (train.seq_len)."""
        return max(len(self.source), len(self.target))


def chars_per_token(tokenizer) -> int | None:
    """The most characters of (normalized) text one token of `tokenizer` can stand for, or None when
    no such bound holds, so that a text of more than `chars_per_token * n` normalized characters is
    known to need more than n tokens without tokenizing it.

    Why it holds: every token a model emits is a vocabulary string matched against a piece of the
    normalized, pre-tokenized text (a BPE merge, a Unigram piece, a byte-level symbol for one byte,
    `<0xNN>` for one byte of a character, an added token's own text), so it covers at most as many
    characters as its string has; ByteLevel and Metaspace pre-tokenizers only map characters to one
    or more symbols. The longest vocabulary string (added tokens included) is therefore the bound.
    It fails, and None is returned, where one token can stand for any amount of text: an unknown-token
    fallback that swallows a whole word or a run of characters (WordLevel, WordPiece, a fused unk of
    BPE or Unigram without complete byte fallback), a pre-tokenizer that drops text (whitespace
    splitting, `Split` with behavior removed, a char delimiter), or an added token that also absorbs
    the spaces around it (lstrip / rstrip). Normalizers may shorten text (composition, SentencePiece's
    space squeezing), so the characters counted are those of the whole text normalized, and an added
    token counts as long as the longer of its text and its normalized text. The tokenizer normalizes
    the pieces between added tokens one by one, where normalizing the whole text squeezes a run of
    spaces at a join that a piece would strip (SentencePiece): at most one character on each side of
    each of the (at most `limit`) added tokens, which `_LengthGuard` allows for."""
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    kind = model.get("type")
    full_fallback = bool(model.get("byte_fallback")) and len(tokenizer.byte_ids) == 256
    if kind == "BPE":
        if model.get("unk_token") is not None and model.get("fuse_unk") and not full_fallback:
            return None
    elif kind == "Unigram":
        if model.get("unk_id") is not None and not full_fallback:  # Unigram always fuses unknown runs
            return None
    else:  # WordLevel, WordPiece: one unknown token for a whole word
        return None
    if _drops_text(data.get("pre_tokenizer")):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in data.get("added_tokens") or []):
        return None
    longest = max((len(token) for token in tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
    normalizer = tokenizer.backend.normalizer
    if normalizer is not None:  # an added token matched on the raw text is counted as normalized below
        added = [t.get("content") or "" for t in data.get("added_tokens") or []]
        longest = max([longest, *(len(normalizer.normalize_str(t)) for t in added)])
    return max(longest, 1)


def _drops_text(pre_tokenizer) -> bool:
    """Whether a pre-tokenizer (or one in a Sequence) removes characters rather than only splitting."""
    if isinstance(pre_tokenizer, list):
        return any(_drops_text(p) for p in pre_tokenizer)
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit"):
        return True
    if str(pre_tokenizer.get("behavior", "")).lower() == "removed":  # Split, Punctuation
        return True
    return _drops_text(pre_tokenizer.get("pretokenizers"))


class _LengthGuard:
    """Refuses a text that cannot fit `limit` tokens before it is tokenized whole: tokenizing a 20 MB
    example to learn that it is too long took tens of seconds and gigabytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.per_token = chars_per_token(tokenizer)

    def check(self, text: str, limit: int | None, limit_name: str) -> None:
        if limit is None or self.per_token is None:
            return
        most = (self.per_token + 2) * limit  # + 2: the joins around added tokens (see chars_per_token)
        if len(text) <= most:
            return  # may fit (the common case costs nothing): tokenizing decides
        normalizer = self.tokenizer.backend.normalizer
        chars = len(normalizer.normalize_str(text)) if normalizer is not None else len(text)
        if chars > most:
            raise BadExample("too long", f"{chars:,} characters, more than {limit_name} = {limit} tokens can hold "
                                         f"(a token of this tokenizer covers at most {self.per_token} characters)")


class PairEncoder:
    """Example (task translate) -> EncodedPair, with the run's tokenizer."""

    def __init__(self, tokenizer):
        if tokenizer.eos_id is None:
            raise SlmforgeError("the tokenizer has no eos token, which ends every source and target of an "
                                "encoder-decoder; use a tokenizer with one")
        self.tokenizer = tokenizer
        self.stop_id = tokenizer.eos_id
        self.guard = _LengthGuard(tokenizer)

    def encode(self, example: Example, limit: int | None = None, limit_name: str = "train.seq_len") -> EncodedPair:
        """The pair's ids; with `limit`, a side whose text cannot fit `limit` tokens is refused as too
        long before it is tokenized."""
        source, target = example.pair
        for side in (source, target):
            self.guard.check(side, limit, limit_name)
        eos = [self.tokenizer.eos_id]
        source_ids, target_ids = self.tokenizer.encode(source), self.tokenizer.encode(target)
        if not target_ids:
            raise BadExample("empty side", "the target encodes to no tokens")
        return EncodedPair(np.asarray(source_ids + eos, dtype=np.int64), np.asarray(target_ids + eos, dtype=np.int64),
                           source, target, example.where)


@dataclass
class TemplateChoice:
    source: str
    """Jinja text (chat) or "" (fim)."""
    added_tokens: tuple[str, ...]
    """Special tokens the template needs in the vocabulary (added when missing)."""
    stop_token: str | None
    """The token that ends an answer in generation (None: the tokenizer's eos)."""


def choose_template(task: str, setting: str, tokenizer_template: str | None) -> TemplateChoice:
    """The template of finetune.task / finetune.chat_template."""
    if task == "fim":
        return TemplateChoice("", FIM_TOKENS, None)
    if setting == "chatml":
        return TemplateChoice(CHATML, CHATML_TOKENS, "<|im_end|>")
    if setting == "plain":
        return TemplateChoice(PLAIN, (), None)
    if setting == "tokenizer":
        if not tokenizer_template:
            raise SlmforgeError("finetune.chat_template: 'tokenizer' but the tokenizer has no chat template; "
                                "use chatml, plain, a .jinja file or the template text")
        return TemplateChoice(tokenizer_template, (), "<|im_end|>" if "<|im_end|>" in tokenizer_template else None)
    if setting.endswith(".jinja"):
        path = Path(setting)
        if not path.is_file():
            raise SlmforgeError(f"finetune.chat_template: {path} not found")
        setting = path.read_text(encoding="utf-8")
    if "{{" not in setting and "{%" not in setting:
        raise SlmforgeError(f"finetune.chat_template: {setting!r} is neither chatml, plain, tokenizer, a .jinja "
                            f"file nor Jinja template text")
    return TemplateChoice(setting, (), "<|im_end|>" if "<|im_end|>" in setting else None)


def render_fim(prefix: str, suffix: str, middle: str, bos: str | None, eos: str) -> Rendered:
    p, s, m = FIM_TOKENS
    head = f"{bos or ''}{p}{prefix}{s}{suffix}{m}"
    return Rendered(head + middle + eos, [(len(head), len(head) + len(middle) + len(eos))], middle)


class ExampleEncoder:
    """Example -> ids and scored mask, with the run's tokenizer and template."""

    def __init__(self, tokenizer, choice: TemplateChoice, task: str):
        self.tokenizer, self.task = tokenizer, task
        self.chat = ChatTemplate.for_tokenizer(choice.source, tokenizer) if task in ("chat", "translate") else None
        self.guard = _LengthGuard(tokenizer)
        if tokenizer.eos_id is None and (task == "fim" or choice.stop_token is None):
            raise SlmforgeError("the tokenizer has no eos token, which ends every answer in this task; use a "
                                "tokenizer with one (or finetune.chat_template = \"chatml\")")
        stop = choice.stop_token or tokenizer.roles["eos"]
        self.stop_id = tokenizer.token_to_id(stop)
        if self.stop_id is None:
            raise SlmforgeError(f"finetune.chat_template: it ends answers with {stop!r}, which is not a token of the "
                                f"tokenizer, so generation could not stop there; use chatml (which adds it) or a "
                                f"template that ends answers with eos_token")

    def render(self, example: Example) -> Rendered:
        if self.task == "fim":
            prefix, suffix, middle = example.fim
            return render_fim(prefix, suffix, middle, self.tokenizer.roles.get("bos"), self.tokenizer.roles["eos"])
        try:
            text = self.chat.render(example.messages)
            spans = self.chat.response_spans(example.messages)
        except ChatTemplateError as e:
            raise BadExample(e.reason, str(e)) from None
        except ChatTemplateLimit as e:  # the template's fault, not the example's: never skipped
            raise ChatTemplateLimit(f"{example.where}: {e}") from None
        last = example.messages[-1]
        return Rendered(text, spans, last["content"] if last["role"] == "assistant" else "")

    def encode(self, example: Example, limit: int | None = None, limit_name: str = "train.seq_len + 1") -> Encoded:
        """The example's ids and scored mask; with `limit`, a text that cannot fit `limit` tokens is
        refused as too long before it is tokenized."""
        rendered = self.render(example)
        self.guard.check(rendered.text, limit, limit_name)
        encoding = self.tokenizer.backend.encode(rendered.text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        scored = np.zeros(len(ids), dtype=bool)
        for start, end in rendered.scored:
            # A token that straddles the start of a response belongs to it: the generation prompt ends
            # before it, so the model must learn to produce it.
            scored |= np.array([s < end and e > start for s, e in encoding.offsets], dtype=bool)
        if not scored.any():
            raise BadExample("empty response", "the response encodes to no tokens")
        last_start = rendered.scored[-1][0]
        prompt_len = next(i for i, (s, e) in enumerate(encoding.offsets) if e > last_start)
        return Encoded(ids, scored, prompt_len, rendered.answer, example.where)


def encode_examples(examples: list[Example], encoder: ExampleEncoder | PairEncoder, limit: int, on_bad: str,
                    skipped: Skipped, limit_name: str = "train.seq_len + 1") -> list[Encoded] | list[EncodedPair]:
    """Encoded examples no longer than `limit` tokens; a bad one fails or is counted, per `on_bad`."""
    encoded = []
    for example in examples:
        try:
            item = encoder.encode(example, limit, limit_name)
            if item.length > limit:
                raise BadExample("too long", f"{item.length} tokens, more than {limit_name} = {limit}")
        except BadExample as e:
            if on_bad == "error":
                raise SlmforgeError(f"{example.where}: {e} (finetune.on_bad_example = \"skip\" leaves such "
                                    f"examples out)") from None
            skipped.add(e.reason, example.where, str(e))
            continue
        encoded.append(item)
    return encoded
