"""The [distill] section of `slmforge distill` (the rest of a recipe is a pretraining recipe: the
student's [model], [objective], data and training loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmforge.config import require
from slmforge.objectives.divergence import DIVERGENCES
from slmforge.train.config import PretrainConfig


@dataclass
class DistillConfig:
    teacher: str = ""
    """The teacher: an slmforge run or checkpoint folder, or a local Hugging Face model folder
    (config.json, safetensors, tokenizer.json) of a family slmforge supports."""
    alpha: float = 0.5
    """Weight of the student's own (hard) loss; the distillation term gets 1 - alpha. 1 = no teacher.
    0.5 at T = 1 was the best fixed alpha of `python -m benchmarks.distill_defaults` (docs/distillation.md)."""
    alpha_end: float | None = None
    """If set, alpha moves linearly from `alpha` to this over the run (e.g. lean on the teacher early)."""
    temperature: float = 1.0
    """Softmax temperature T of both distributions in the distillation term. 1 won over 2 and 8 on every
    objective measured (issue 25: at T = 2 a student ended worse than alone on average)."""
    temperature_end: float | None = None
    """If set, T moves linearly from `temperature` to this over the run."""
    adaptive: bool = False
    """alpha per batch from the teacher-student gap instead of `alpha`/`alpha_end`: 0 (all teacher) while
    the teacher's hard loss on the batch is at least `adaptive_margin` x the student's below it, rising
    linearly to 1 (the student's own loss) as the gap closes; 1 once the student does as well as its
    teacher, or with a teacher that predicts the labels worse. Train records gain `alpha` and
    `teacher_loss`; costs the teacher's output layer once more per batch."""
    adaptive_margin: float = 0.05
    """The gap, as a share of the student's hard loss, at and above which adaptive alpha is 0."""
    adaptive_smoothing: float = 0.0
    """In [0, 1): the gap adaptive alpha reads is this x its moving average over the steps before (each
    step's gap over all of its targets) + (1 - this) x the batch's own. 0: the batch's gap alone (the
    default: 0.5 and 0.9 did not win clearly in `python -m benchmarks.distill_defaults`; 0.9 helped
    masked-LM students of a strong teacher and hurt those of a weak one, docs/distillation.md)."""
    control: bool = True
    """Say when distillation makes the student worse than it would be alone: a twin of the student trained
    on its own loss beside it for the first `control_steps` steps (same batches, optimizer and schedule),
    compared on each batch before either trains on it; and the teacher's own loss on the validation
    batches (val records gain `teacher_loss`), with a warning once the student has caught up with it while
    alpha is fixed below 1."""
    control_steps: int = 200
    """Steps the control's alone twin trains (at most half the run; 0 = no twin). It costs a student's
    forward and backward per step, and a copy of the student and its optimizer state, for those steps."""
    divergence: Literal["forward_kl", "reverse_kl", "js", "tv"] = "forward_kl"
    """forward_kl (Hinton: KL(teacher || student) x T^2), reverse_kl, js (Jensen-Shannon), tv (total
    variation)."""
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 weights on a GPU that supports it (the teacher needs no gradients), else float32."""
    chunk_rows: int = 1024
    """Rows of (student and teacher) logits computed at a time in the distillation term."""
    hidden_weight: float = 0.0
    """Weight of a hidden-state term added to the loss (0 = off): the student's features before its
    output head are matched to the teacher's at the scored positions, through a learned linear
    projection when their widths differ (trained with the student, kept in the trainer state)."""
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    """cosine: 1 - cosine similarity; mse: mean squared difference."""
    top_k: int = 32
    """Teacher logits kept per position in the offline cache (`slmforge distill --build-cache`)."""
    teacher_cache: str = ""
    """A folder written by `--build-cache`: train from the teacher's cached top-k logits (forward KL over
    them) instead of running the teacher."""
    eval_texts: dict[str, str] = field(default_factory=dict)
    """Texts to compare teacher and student on at the end, by language: {hi = "hi.txt", en = "en.txt"}
    (loss and perplexity, bits per byte for causal LMs; each model with its own tokenizer)."""

    def validate(self) -> None:
        require(bool(self.teacher), "teacher", "required: a run folder or a Hugging Face model folder")
        for name in ("alpha", "alpha_end"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, name, f"must be in [0, 1], got {value}")
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be positive, got {value}")
        require(self.divergence in DIVERGENCES, "divergence", f"one of {', '.join(DIVERGENCES)}")
        require(0 < self.adaptive_margin <= 1, "adaptive_margin", f"must be in (0, 1], got {self.adaptive_margin}")
        require(0 <= self.adaptive_smoothing < 1, "adaptive_smoothing",
                f"must be in [0, 1), got {self.adaptive_smoothing}")
        require(self.control_steps >= 0, "control_steps", f"must be >= 0, got {self.control_steps}")
        require(self.chunk_rows > 0, "chunk_rows", f"must be positive, got {self.chunk_rows}")
        require(self.top_k > 0, "top_k", f"must be positive, got {self.top_k}")
        require(self.hidden_weight >= 0, "hidden_weight", f"must be >= 0, got {self.hidden_weight}")
        require(not (self.teacher_cache and self.hidden_weight), "hidden_weight",
                "needs the teacher's hidden states, which a teacher cache does not hold")
        require(not self.teacher_cache or self.divergence == "forward_kl", "divergence",
                "a teacher cache holds top-k logits, which give forward_kl only")
        require(not (self.teacher_cache and self.adaptive), "adaptive",
                "needs the teacher's loss on each batch, which a teacher cache (top-k logits) does not give")

    def at(self, progress: float) -> tuple[float, float]:
        """(alpha, temperature) at `progress` (0 at the first step, 1 at the last)."""
        alpha = self.alpha if self.alpha_end is None else self.alpha + (self.alpha_end - self.alpha) * progress
        temperature = (self.temperature if self.temperature_end is None
                       else self.temperature + (self.temperature_end - self.temperature) * progress)
        return alpha, temperature


@dataclass
class DistillRunConfig(PretrainConfig):
    """Sections read by `slmforge distill`: a pretraining recipe plus [distill]."""

    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        super().validate()
        # the student's hard loss is the plain cross-entropy: a z-loss set here would be silently unused
        require(not getattr(self.objective, "z_loss", 0), "objective.z_loss",
                "distillation does not add the z-loss to the student's hard loss; leave it at 0")
