"""Config sections of a training run (`slmforge pretrain`); one dataclass per concern.

A recipe file may hold every verb's sections: [tokenizer] (tokenizer train), [data] (data prepare),
and [model] [objective] [optim] [schedule] [train] [tracking] (pretrain). Each verb reads its own and
skips the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmforge.config import require
from slmforge.models import DecoderConfig, ModelConfig
from slmforge.models.presets import family_of
from slmforge.models.registry import FAMILIES
from slmforge.objectives import DEFAULT_FOR_KIND, ObjectiveConfig
from slmforge.train.parallel import ParallelConfig


# The first torch with torch.optim.Muon (optim.kind = "muon").
MUON_TORCH = "2.9"


@dataclass
class OptimConfig:
    kind: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter. muon: torch.optim.Muon (torch >= 2.9) for the 2-D weights of the
    linear layers inside the transformer blocks (attention and MLP projections), AdamW (lr, betas, eps,
    weight_decay below) for the embeddings, the output head, norms and biases. Not with
    parallel.strategy = "fsdp" (Muon needs whole matrices) nor LoRA (adapters stay on AdamW)."""
    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup); with kind = "muon", AdamW's part's."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon (seed 003 used 1e-9)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms, not biases)."""
    decay_embeddings: bool = True
    """false: the embeddings (every nn.Embedding, the output head tied or untied) take no weight decay,
    like norms and biases; true: they decay with weight_decay as the other matrices do."""
    lr_width_base: int = 0
    """kind = "adamw": the width (model.hidden_size) lr was tuned at; the hidden matrices (the blocks'
    linear weights) then step with lr x lr_width_base / model.hidden_size (muP's 1/width for Adam), so lr
    transfers to wider or narrower models; embeddings, head, norms and biases keep lr. 0: off. Not with
    kind = "muon" (Muon's lr adjustment already scales its updates by each matrix's shape)."""
    fused: Literal["auto", "on", "off"] = "auto"
    """Fused AdamW kernel: auto = on CUDA when available."""
    muon_lr: float = 0.02
    """kind = "muon": Muon's peak learning rate; the schedule scales it as it scales lr (0.02: Keller
    Jordan's Muon README and modded-nanogpt, with muon_adjust_lr_fn = "original")."""
    muon_momentum: float = 0.95
    """kind = "muon": Muon's (Nesterov) momentum (0.95: torch's and Keller Jordan's default)."""
    muon_weight_decay: float = 0.01
    """kind = "muon": decoupled weight decay of the Muon matrices, w -= lr x muon_weight_decay x w each
    step, lr being Muon's scheduled one before muon_adjust_lr_fn (0.01: Keller Jordan's Muon README)."""
    muon_adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original"
    """kind = "muon": how torch scales Muon's lr by a matrix's shape (out, in): original = x sqrt(max(1,
    out/in)) (Keller Jordan); match_rms_adamw = x 0.2 sqrt(max(out, in)), updates of AdamW's size
    (Moonshot, "Muon is Scalable for LLM Training"): then muon_lr ~ lr and muon_weight_decay ~
    weight_decay can be reused from AdamW."""

    def validate(self) -> None:
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        require(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        require(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}")
        require(0 <= self.muon_momentum < 1, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        require(self.muon_weight_decay >= 0, "muon_weight_decay", f"must be >= 0, got {self.muon_weight_decay}")
        require(self.lr_width_base >= 0, "lr_width_base", f"must be >= 0 (0: off), got {self.lr_width_base}")
        require(self.lr_width_base == 0 or self.kind == "adamw", "lr_width_base",
                'scales AdamW\'s hidden matrices; under kind = "muon" they are Muon\'s, whose muon_adjust_lr_fn '
                'already scales each update by its matrix\'s shape: set it to 0')
        if self.kind == "muon":
            import torch

            require(hasattr(torch.optim, "Muon"), "kind",
                    f'"muon" needs torch >= {MUON_TORCH} (torch.optim.Muon); this is torch {torch.__version__}: '
                    f'upgrade torch or use optim.kind = "adamw"')


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to optim.lr."""
    decay: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Shape of the decay from optim.lr to min_lr_ratio * optim.lr over the remaining steps; wsd (warmup,
    stable, decay): hold optim.lr until the last cooldown_ratio of the steps, then cool down to the floor."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_ratio: float | None = None
    """If set, warmup_steps = warmup_ratio x train.max_steps (seed 001: 0.06)."""
    cooldown_ratio: float = 0.2
    """decay = "wsd": the share of train.max_steps spent cooling down (the last round(cooldown_ratio x
    max_steps) steps; 0.2: Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
    Training Durations"). Raising max_steps on resume during the stable phase extends the run."""
    cooldown_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    """decay = "wsd": the cooldown's shape from the peak to the floor over progress p in [0, 1]: linear =
    1 - p, 1-sqrt = 1 - sqrt(p) (which Hägele et al. 2024 found better than linear)."""

    def validate(self) -> None:
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, "warmup_ratio",
                f"must be in [0, 1), got {self.warmup_ratio}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.cooldown_ratio <= 1, "cooldown_ratio", f"must be in [0, 1], got {self.cooldown_ratio}")


@dataclass
class TrainLoopConfig:
    out_dir: str = "runs/pretrain"
    """Run folder: config, metrics, plots, checkpoints and tokenizer go here."""
    data: str = ""
    """Folder made by `slmforge data prepare` (manifest.json + shards); default: the recipe's data.out."""
    seq_len: int = 256
    """Tokens per training sequence (the context length trained on)."""
    batch_size: int = 8
    """Sequences per micro-batch on each process (sequences per step = batch_size x grad_accum x
    processes; 2 processes with batch_size B train the same model as 1 with 2B)."""
    train_split: str = "train"
    """Split of the prepared data to train on."""
    val_split: str = "val"
    """Split used for periodic evaluation (skipped if the data has none)."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    epochs: float = 0
    """If > 0, train this many passes over the training split: max_steps is computed from it (set
    train.epochs=0 to give max_steps yourself)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    batch_warmup_steps: int = 0
    """Batch-size warmup (0 = off): over the first batch_warmup_steps optimizer steps every micro-batch holds
    fewer sequences, from batch_warmup_start x batch_size up to batch_size in equal stages (GPT-3 ramped its
    batch over the first tokens). The learning rate schedule stays per step; the loader hands out only the
    sequences trained on (none skipped), and tokens count those, so the ramp's saving shows in tokens.
    train.epochs turns into steps as if every batch were full (a ramped run reads a little less)."""
    batch_warmup_start: float = 0.25
    """batch_warmup_steps > 0: the first steps' micro-batch as a share of batch_size. batch_size x this must
    be a whole number u dividing batch_size; micro-batches hold u, 2u, ... sequences, each for an equal share
    of the warmup (0.25 with batch_size 8: 2, 4, 6, then 8), the same share on every process."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = 200
    """Steps between validation passes (0 disables; a final one always runs)."""
    eval_batches: int = 20
    """Validation batches per pass (the same ones each time)."""
    eval_batch_size: int = 0
    """Sequences per validation batch (0 = batch_size)."""
    save_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Checkpoints kept on disk (older step folders are deleted; the best by validation loss is kept
    too); 0 keeps all."""
    save_best: bool = True
    """Also save when validation reaches a new best between save_every steps, so the best model is
    always on disk (and kept through pruning), not only when an evaluation falls on a save step."""
    save_every_minutes: float = 0
    """Also save when this many minutes passed since the last checkpoint (0 = off): bounds the work a
    crash can cost whatever the step time."""
    max_bad_steps: int = 10
    """Steps in a row with a non-finite loss or gradient (each update skipped) before the run stops."""
    log_every: int = 10
    """Steps between progress lines and metrics.jsonl records."""
    seed: int = 1337
    """Seeds weights, data order and masks (the same on every rank) and dropout (rank r uses seed + r)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on a GPU that supports it, fp32 on CPU."""
    compile: bool | Literal["blocks", "model"] = False
    """torch.compile for training (GPU runs; a minute or more of warm-up): "blocks" (or true) compiles
    each transformer block; "model" compiles the whole step's forward, the model and the chunked loss
    as one graph (not with parallel.strategy = "fsdp", which shards and compiles block by block)."""
    loss_kernel: Literal["chunked", "liger"] = "chunked"
    """The output layer + cross-entropy: chunked = slmforge's chunked linear cross-entropy (any device,
    never the full logits); liger = Liger-Kernel's fused one (CUDA, `pip install liger-kernel`)."""
    loss_chunk_rows: int | None = None
    """Rows of logits per chunk of the chunked loss (default: sized to the device, 1 GiB of fp32
    logits on CPU and 2 GiB on CUDA, 256-8,192 rows); smaller saves memory, larger is faster."""
    attention: Literal["sdpa", "flex"] = "sdpa"
    """Attention kernel of decoder training: flex = FlexAttention with block masks (compiled) for
    sliding-window layers, packed documents and padding, instead of SDPA with a boolean (T, T) mask; the
    same numbers. Needs CUDA (torch has no FlexAttention backward on CPU or MPS: SDPA is kept there)."""
    resume: Literal["auto", "never", "required"] = "auto"
    """auto: continue from out_dir's latest checkpoint if there is one."""
    allow_config_changes: bool = False
    """Resume even though the data, seed, seq_len, global batch or objective changed since the checkpoint
    (the result then differs from an uninterrupted run; the change is logged)."""
    init_from: str = ""
    """Start from this run/checkpoint folder (e.g. one made by import-hf): its architecture and weights
    replace [model]; the optimizer and schedule start fresh."""

    def validate(self) -> None:
        require(self.save_every_minutes >= 0, "save_every_minutes", f"must be >= 0, got {self.save_every_minutes}")
        for name in ("max_steps", "grad_accum", "log_every", "eval_batches", "seq_len", "batch_size", "max_bad_steps"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        for name in ("eval_every", "save_every", "keep_last", "eval_batch_size"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.clip_grad >= 0, "clip_grad", f"must be >= 0, got {self.clip_grad}")
        require(self.loss_chunk_rows is None or self.loss_chunk_rows > 0, "loss_chunk_rows",
                f"must be positive, got {self.loss_chunk_rows}")
        require(self.batch_warmup_steps >= 0, "batch_warmup_steps", f"must be >= 0, got {self.batch_warmup_steps}")
        start = self.batch_warmup_start
        require(0 < start <= 1, "batch_warmup_start", f"must be in (0, 1] (a share of batch_size), got {start}")
        if self.batch_warmup_steps:  # (the batch size may be one the start does not divide while the ramp is off)
            unit = self.batch_size * start
            whole = abs(unit - round(unit)) < 1e-9 and round(unit) >= 1
            require(whole and self.batch_size % round(unit) == 0, "batch_warmup_start",
                    f"{start} x batch_size {self.batch_size} = {unit:g} sequences; it must be a whole number "
                    f"that divides batch_size (e.g. 0.25 or 0.5 of a batch_size divisible by 4 or 2)")

    def micro_batch_at(self, step: int) -> int:
        """Sequences per micro-batch on each process at the 0-based optimizer step `step`: batch_size, or
        during the batch warmup u x (1 + (stages - 1) x step // batch_warmup_steps), u being the start size
        and stages = batch_size / u (integers only: every process and every resume computes the same)."""
        if step >= self.batch_warmup_steps:
            return self.batch_size
        unit = round(self.batch_size * self.batch_warmup_start)
        stages = self.batch_size // unit
        return unit * (1 + (stages - 1) * step // self.batch_warmup_steps)


@dataclass
class TrackingConfig:
    backends: list[str] = field(default_factory=list)
    """Extra experiment trackers besides metrics.jsonl: any of wandb, mlflow, tensorboard."""
    project: str = "slmforge"
    """Project / experiment name for the trackers."""
    run_name: str = ""
    """Run name for the trackers (default: the run folder's name)."""

    def validate(self) -> None:
        for i, name in enumerate(self.backends):
            require(name in ("wandb", "mlflow", "tensorboard"), f"backends[{i}]",
                    f"must be one of wandb, mlflow, tensorboard, got {name!r}")


@dataclass
class PretrainConfig:
    """Sections read by `slmforge pretrain`."""


    model: ModelConfig = field(default_factory=DecoderConfig)
    objective: ObjectiveConfig | None = None
    """[objective]: what the model learns; `kind` picks it (default: clm for decoders, mlm for encoders)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        require(self.train.seq_len <= self.model.max_seq_len, "train.seq_len",
                f"must be <= model.max_seq_len ({self.model.max_seq_len}), got {self.train.seq_len}")

    @classmethod
    def expand_config(cls, data: dict) -> dict:
        """Config-loading hook: skip other verbs' sections; default train.data to the recipe's data.out."""
        data = dict(data)
        prepared = data.pop("data", None)
        data.pop("tokenizer", None)
        data.pop("curate", None)
        # An [objective] section without `kind` gets the model's: clm for decoders, mlm for encoders.
        # Without the section, pretrain decides once the model is known (init_from may replace it).
        objective = data.get("objective")
        if isinstance(objective, dict) and "kind" not in objective:
            family = family_of(data.get("model") or {})
            kind = FAMILIES[family].kind if family in FAMILIES else "decoder"
            data["objective"] = {"kind": DEFAULT_FOR_KIND[kind], **objective}
        train = dict(data.get("train", {}))
        if not train.get("data") and isinstance(prepared, dict) and prepared.get("out"):
            train["data"] = prepared["out"]
            data["train"] = train
        return data
