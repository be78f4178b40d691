"""Config sections of `slmforge finetune`: [finetune] (examples, template, task), [lora], and the
training sections it shares with pretraining ([optim] [schedule] [train] [tracking] [parallel])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmforge.config import require
from slmforge.models import ModelConfig
from slmforge.train.config import OptimConfig, ScheduleConfig, TrackingConfig, TrainLoopConfig
from slmforge.train.parallel import ParallelConfig

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ExamplesConfig:
    """[finetune]: what the model is fine-tuned on and how examples become tokens."""

    task: Literal["chat", "fim", "translate", "classify", "tag"] = "chat"
    """chat: prompt -> response (instructions, clarification, masked-word infilling), loss on the
    response only; fim: fill-in-the-middle for decoders (prefix, suffix -> middle), loss on the middle;
    translate: source/target pairs (src_field, tgt_field), for encoder-decoders (source -> encoder,
    target -> decoder) and decoders (translate_prompt in the chat template, loss on the target);
    classify: one label per text or text pair, tag: one BIO tag per word (encoders: a classification
    head on the first token, or on every word's first token; finetune/classify.py)."""
    train_files: list[str] = field(default_factory=list)
    """JSONL files of training examples (one JSON object per line; .gz/.zst allowed)."""
    val_files: list[str] = field(default_factory=list)
    """JSONL files of held-out examples (default: val_fraction of train_files, held out by seed)."""
    val_fraction: float = 0.05
    """Share of the training examples held out for validation when no val_files are given."""
    format: Literal["auto", "prompt_response", "messages"] = "auto"
    """chat examples: prompt/response fields, or a list of {role, content} messages (auto: per line)."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str = ""
    """Field holding a per-example system message (empty: none, or system_prompt)."""
    messages_field: str = "messages"
    prefix_field: str = "prefix"
    suffix_field: str = "suffix"
    middle_field: str = "middle"
    src_field: str = "src"
    """translate: the field holding the source sentence (as `slmforge data pairs` writes it)."""
    tgt_field: str = "tgt"
    """translate: the field holding the target sentence."""
    text_field: str = "text"
    """classify: the field holding the text."""
    text_pair_field: str = "text_pair"
    """classify: the field holding an optional second text (a pair: [CLS] text [SEP] text_pair [SEP])."""
    label_field: str = "label"
    """classify: the field holding the label (a string or an integer)."""
    tokens_field: str = "tokens"
    """tag: the field holding the words (a list of strings, each tokenized on its own)."""
    tags_field: str = "tags"
    """tag: the field holding one tag per word (O, B-TYPE, I-TYPE)."""
    labels: list[str] = field(default_factory=list)
    """classify / tag: the label set in id order (empty: every label of the training files, sorted);
    kept with the run (the model's id2label)."""
    translate_prompt: str = "Translate:\n{src}"
    """translate, decoders: the user turn a source becomes ({src} is replaced by it); the target is the
    assistant's answer in finetune.chat_template."""
    system_prompt: str = ""
    """A system message put before every chat example that has none."""
    chat_template: str = "chatml"
    """chatml (<|im_start|>role ... <|im_end|>, tokens added to the tokenizer), plain (prompt, newline,
    response, eos), tokenizer (the template the tokenizer already carries), a .jinja file, or the
    Jinja text itself. Stored with the run's tokenizer and exported to Hugging Face."""
    packing: bool = True
    """Pack several examples into each row (attention and positions restart per example); false pads
    each example to the longest in its batch. Both give the same loss."""
    on_bad_example: Literal["error", "skip"] = "error"
    """A line without the fields, an empty response or an example longer than train.seq_len + 1
    tokens: error names the file and line; skip counts and reports them."""
    tokenizer: str = ""
    """Tokenizer folder, only when starting without train.init_from (a model trained from scratch)."""
    freeze: list[str] = field(default_factory=list)
    """Full fine-tuning: parameter-name patterns (fnmatch, e.g. "embed.*", "layers.0.*") kept frozen."""
    eval_samples: int = 16
    """Held-out examples answered by greedy generation at the end: exact match, chrF (and BLEU for
    translate) and a table of prompts, references and outputs in the run folder (0 = off)."""
    max_new_tokens: int = 128
    """Longest generated answer in that evaluation."""

    def validate(self) -> None:
        require(bool(self.train_files), "train_files", "required: JSONL files of training examples")
        require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.eval_samples >= 0, "eval_samples", f"must be >= 0, got {self.eval_samples}")
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        for name in ("prompt_field", "response_field", "messages_field", "prefix_field", "suffix_field",
                     "middle_field", "src_field", "tgt_field", "text_field", "label_field", "tokens_field",
                     "tags_field"):
            require(bool(getattr(self, name)), name, "must not be empty")
        require(len(set(self.labels)) == len(self.labels) and all(self.labels), "labels",
                f"must be distinct, non-empty names, got {self.labels}")
        require(self.task != "translate" or "{src}" in self.translate_prompt, "translate_prompt",
                f"must contain {{src}} (where the source goes), got {self.translate_prompt!r}")


@dataclass
class LoraConfig:
    """[lora]: low-rank adapters through `peft` (rank 0: full fine-tuning)."""

    rank: int = 0
    """Adapter rank r; 0 trains the whole model (minus finetune.freeze)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Module names (or name suffixes) that get adapters: q_proj k_proj v_proj o_proj gate_proj up_proj
    down_proj in slmforge decoders."""

    def validate(self) -> None:
        require(self.rank >= 0, "rank", f"must be >= 0, got {self.rank}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.rank == 0 or bool(self.target_modules), "target_modules", "must name at least one module")


@dataclass
class FinetuneConfig:
    """Sections read by `slmforge finetune`."""

    finetune: ExamplesConfig = field(default_factory=ExamplesConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    model: ModelConfig | None = None
    """[model]: only without train.init_from (a model trained on the examples from scratch)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=20))
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(out_dir="runs/finetune"))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        require(bool(self.train.init_from) or self.model is not None, "train.init_from",
                "required: the run, checkpoint or imported model to fine-tune (or give a [model] section "
                "and finetune.tokenizer to train from scratch)")
        require(self.model is None or bool(self.finetune.tokenizer) or bool(self.train.init_from),
                "finetune.tokenizer", "required with a [model] section (the examples must be tokenized)")
        require(self.lora.rank == 0 or not self.finetune.freeze, "finetune.freeze",
                "applies to full fine-tuning; with LoRA only the adapters train")

    @classmethod
    def expand_config(cls, data: dict) -> dict:
        """Config-loading hook: other verbs' sections of a shared recipe file are not ours."""
        data = dict(data)
        for section in ("data", "tokenizer", "objective", "curate", "pairs"):
            data.pop(section, None)
        return data
