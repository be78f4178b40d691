"""`slmforge finetune`: examples in, a fine-tuned model out, on the same Trainer and run folder as
pretraining. For a decoder the objective is next-token prediction with the prompt tokens unscored; for
an encoder-decoder (finetune.task = "translate") it is sequence-to-sequence (source -> encoder, target
-> decoder, objectives/seq2seq.py). What differs from pretraining is the data (examples, packed or
padded; pairs), the tokenizer (task tokens and a chat template added, for decoders) and the trainable
parameters (all, all but frozen patterns, or LoRA adapters)."""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import numpy as np
import torch

from slmforge import config as config_io
from slmforge.checkpoint.meta import CheckpointMeta
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import FinetuneConfig
from slmforge.finetune.evaluate import generation_eval, pair_generation_eval, write_samples
from slmforge.finetune.examples import Skipped, read_examples
from slmforge.finetune.loader import ExampleLoader, PairLoader
from slmforge.finetune.lora import BASE_DIR, LoraCheckpoints, apply_lora
from slmforge.finetune.templates import (
    Encoded,
    EncodedPair,
    ExampleEncoder,
    PairEncoder,
    TemplateChoice,
    choose_template,
    encode_examples,
)
from slmforge.checkpoint.reading import find_tokenizer_dir, resolve_checkpoint, write_eval_report
from slmforge.checkpoint.writing import write_model_folder
from slmforge.finetune.vocab import add_special_tokens, fit_embeddings
from slmforge.formatting import human, say
from slmforge.models import family
from slmforge.objectives.clm import CausalLM
from slmforge.objectives.seq2seq import Seq2Seq
from slmforge.train.parallel import barrier
from slmforge.train.run import RunParts, TrainingRun
from slmforge.train.session import Session, training_session
from slmforge.train.trainer import Trainer


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune per `cfg` (resuming from its run folder when possible); returns the run folder."""
    if cfg.lora.rank and cfg.parallel.strategy == "fsdp":
        raise SlmforgeError("parallel.strategy: LoRA runs use DDP (the adapters are small); fsdp is for full "
                            "fine-tuning of models that do not fit one device")
    with training_session(cfg.train, cfg.parallel) as session:
        if cfg.finetune.task in ("classify", "tag"):  # encoders: a label per text, or per word
            from slmforge.finetune.classify import finetune_labels

            return finetune_labels(cfg, session)
        return _finetune(cfg, session)


def _finetune(cfg: FinetuneConfig, session: Session) -> Path:
    loop, ex = cfg.train, cfg.finetune
    run_dir, resume_dir, where = session.run_dir, session.resume_dir, session.where
    run = TrainingRun.start(cfg, session)

    tokenizer, choice, new_ids, init_dir = _model_and_tokenizer(run)
    seq2seq = family(cfg.model).kind == "encoder-decoder"
    if loop.seq_len > cfg.model.max_seq_len:  # before any step: an encoder-decoder side is one sequence too
        raise SlmforgeError(f"train.seq_len: {loop.seq_len} exceeds the model's context, model.max_seq_len = "
                            f"{cfg.model.max_seq_len}; lower train.seq_len")
    encoder = PairEncoder(tokenizer) if seq2seq else ExampleEncoder(tokenizer, choice, ex.task)
    train_examples, val_examples = _examples(cfg, encoder, seq2seq)

    model = run.build(weights_from=init_dir)
    if init_dir is not None:  # (None when resuming: the run's own grown vocabulary is in its checkpoint)
        fit_embeddings(model, tokenizer.vocab_size, new_ids)
    base_meta = _meta(cfg, tokenizer, choice)
    checkpoint_format = None
    if cfg.lora.rank:
        if resume_dir is None and where.is_main:  # the base, once: what resumes load under the adapters
            write_model_folder(run_dir / BASE_DIR, model, {**base_meta, "role": "LoRA base weights"})
        barrier()
        if new_ids:
            say(f"warning: LoRA trains adapters only, so the {len(new_ids)} token(s) added for this task keep the "
                f"embedding they start with (the mean); finetune.chat_template = \"plain\" adds none, full "
                f"fine-tuning trains them")
        targets = apply_lora(model, cfg.lora)
        checkpoint_format = LoraCheckpoints(cfg.lora, run_dir)
        say(f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {len(targets)} modules")
    else:
        _freeze(model, ex.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    split = dict(rank=where.rank, world_size=where.world_size)
    if seq2seq:
        objective = Seq2Seq()
        make_loader = lambda examples, size, **kw: PairLoader(  # noqa: E731
            examples, size, pad_id=pad_id, **split, **kw)
    else:
        objective = CausalLM()
        make_loader = lambda examples, size, **kw: ExampleLoader(  # noqa: E731
            examples, loop.seq_len + 1, size, packing=ex.packing, pad_id=pad_id, **split, **kw)
    train_loader = make_loader(train_examples, loop.batch_size, seed=loop.seed)
    val_batches = None
    if val_examples:
        val_loader = make_loader(val_examples, loop.eval_batch_size or loop.batch_size, shuffle=False, training=False)
        val_batches = lambda: val_loader.epoch_batches(loop.eval_batches)  # noqa: E731

    description = (f"{cfg.model.family} {human(total)} parameters, {human(trainable)} trainable "
                   f"({100 * trainable / total:.2f}%) | {len(train_examples):,} examples in "
                   f"{train_loader.num_windows:,} rows ({'padded pairs' if seq2seq else 'packed' if ex.packing else 'padded'}"
                   f", {100 * train_loader.fill:.0f}% filled) | {len(val_examples):,} held out")
    trainer, held_out = run.fit(RunParts(model=model, objective=objective, train_loader=train_loader,
                                         val_batches=val_batches, fingerprint=_fingerprint(train_examples, cfg),
                                         meta=base_meta, description=description,
                                         identity=finetune_identity(cfg, ex.packing),
                                         checkpoint_format=checkpoint_format))
    if where.is_main and ex.eval_samples and (val_examples or train_examples):
        _evaluate(trainer, val_examples or train_examples, encoder, tokenizer, ex, held_out, run_dir)
    return run_dir


def finetune_identity(cfg: FinetuneConfig, packing: bool) -> dict:
    """What a fine-tuning run's exactness depends on beyond the config's EXACTNESS_FIELDS, named apart
    from the data so that a resume with another LoRA setting or packing says so."""
    return {"finetune.packing": packing, "lora": config_io.to_dict(cfg.lora)}


def _model_and_tokenizer(run: TrainingRun):
    """Model config, the run's tokenizer (task tokens and template added), its template, the ids of
    tokens added now, and the folder to take weights from (None when resuming or from scratch)."""
    from slmforge.tokenizer import load_tokenizer

    cfg, session = run.cfg, run.session
    ex, run_dir = cfg.finetune, session.run_dir
    if session.resume_dir is not None:  # the run's own tokenizer and (grown) architecture
        cfg.model = CheckpointMeta.read(session.resume_dir).model_config()
        tokenizer = load_tokenizer(run_dir / "tokenizer")
        return tokenizer, _template(cfg, tokenizer), [], None
    init_dir = run.init_from()
    source = find_tokenizer_dir(init_dir) if init_dir is not None else Path(ex.tokenizer)
    base = load_tokenizer(source)
    choice = _template(cfg, base)
    tokenizer, new_ids = add_special_tokens(base, choice.added_tokens, choice.source or None)
    if new_ids:
        say(f"added {', '.join(choice.added_tokens)} to the tokenizer")
    if init_dir is None and cfg.model.vocab_size != tokenizer.vocab_size:
        cfg.model.vocab_size = tokenizer.vocab_size
    if session.where.is_main:
        tokenizer.save(run_dir / "tokenizer")
    barrier()
    return tokenizer, choice, new_ids, init_dir


def _template(cfg: FinetuneConfig, tokenizer) -> TemplateChoice:
    """The task's template; encoder-decoders take sources and targets as they are, with no template
    (and a task other than translate is refused for them, as every task is for encoders)."""
    ex, kind = cfg.finetune, family(cfg.model).kind
    if kind == "encoder":
        raise SlmforgeError(f"train.init_from: a {cfg.model.family} encoder; it fine-tunes with finetune.task = "
                            f"\"classify\" or \"tag\" ({ex.task!r} is for decoders; to continue an encoder's "
                            f"masked-LM training use `slmforge pretrain train.init_from=...`)")
    if kind == "encoder-decoder":
        if ex.task != "translate":
            raise SlmforgeError(f"finetune.task: {ex.task!r} is for decoders; a {cfg.model.family} encoder-decoder "
                                f"fine-tunes with finetune.task = \"translate\" (source -> encoder, target -> decoder)")
        return TemplateChoice("", (), None)
    return choose_template(ex.task, ex.chat_template, tokenizer.meta.get("hf_settings", {}).get("chat_template"))


def _examples(cfg: FinetuneConfig, encoder: ExampleEncoder | PairEncoder, seq2seq: bool = False
              ) -> tuple[list[Encoded], list[Encoded]] | tuple[list[EncodedPair], list[EncodedPair]]:
    """Encoded training and held-out examples; bad ones fail or are counted, per on_bad_example.
    A decoder's example must fit a row of train.seq_len + 1 tokens, each side of a pair train.seq_len."""
    ex = cfg.finetune
    limit, name = (cfg.train.seq_len, "train.seq_len") if seq2seq else (cfg.train.seq_len + 1, "train.seq_len + 1")
    skipped = Skipped()

    def encode(files: list[str]):
        return encode_examples(read_examples(files, ex, skipped), encoder, limit, ex.on_bad_example, skipped, name)

    train = encode(ex.train_files)
    if ex.val_files:
        val = encode(ex.val_files)
    elif ex.val_fraction > 0 and len(train) >= 10:
        order = np.random.default_rng([cfg.train.seed, 7]).permutation(len(train))
        held = set(order[:max(1, round(ex.val_fraction * len(train)))].tolist())
        val = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    else:
        val = []
        if ex.val_fraction > 0:
            say(f"warning: only {len(train)} training examples: none held out for validation (give "
                f"finetune.val_files to validate anyway)")
    if skipped.total:
        say(f"skipped {skipped.total} example(s): {skipped.summary()}")
    if not train:
        raise SlmforgeError(f"finetune.train_files: no usable examples in {', '.join(ex.train_files)}")
    return train, val


def _freeze(model: torch.nn.Module, patterns: list[str]) -> None:
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatch(name, pattern) for name in names):
            raise SlmforgeError(f"finetune.freeze: {pattern!r} matches no parameter (names look like {names[1]!r})")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            param.requires_grad_(False)


def _fingerprint(examples: list[Encoded] | list[EncodedPair], cfg: FinetuneConfig) -> str:
    """What the training rows are made of: example ids and scored masks (or sources and targets)."""
    digest = hashlib.sha256()
    for e in examples:
        for array in ((e.source, e.target) if isinstance(e, EncodedPair) else (e.ids, e.scored)):
            digest.update(array.tobytes())
    return digest.hexdigest()


def _meta(cfg: FinetuneConfig, tokenizer, choice: TemplateChoice) -> dict:
    """What eval, generate, translate and export need to know of a fine-tuned checkpoint. An
    encoder-decoder records no objective: `eval` scores it with its family's (span corruption), the
    pretraining form it keeps; the translation figures are the generation eval's."""
    seq2seq = family(cfg.model).kind == "encoder-decoder"
    return {"tokenizer_sha256": tokenizer.sha256, "seq_len": cfg.train.seq_len,
            "add_bos": tokenizer.bos_id is not None and not seq2seq,
            **({} if seq2seq else {"objective": {"kind": "clm"}}),
            "finetune": {"task": cfg.finetune.task, "chat_template": None if seq2seq else cfg.finetune.chat_template,
                         "stop_token": choice.stop_token or tokenizer.roles.get("eos"),
                         "lora": config_io.to_dict(cfg.lora) if cfg.lora.rank else None,
                         "examples": list(cfg.finetune.train_files)}}


def _evaluate(trainer: Trainer, examples: list[Encoded] | list[EncodedPair], encoder: ExampleEncoder | PairEncoder,
              tokenizer, ex, held_out, run_dir: Path) -> None:
    """Held-out loss (from the final validation) and generation metrics into the last checkpoint's
    eval.json; the sample table into the run folder."""
    if isinstance(encoder, PairEncoder):
        summary, rows = pair_generation_eval(trainer.model, examples[:ex.eval_samples], tokenizer, ex.max_new_tokens)
    else:
        summary, rows = generation_eval(trainer.model, examples[:ex.eval_samples], tokenizer, encoder.stop_id,
                                        ex.max_new_tokens, translate=ex.task == "translate")
    write_samples(rows, run_dir)
    row = {**(held_out or {}), **summary, "step": trainer.state.step}
    step_dir = resolve_checkpoint(run_dir)
    write_eval_report({"finetune_held_out" if held_out else "finetune_train_sample": row}, step_dir / "eval.json")
    shown = f"exact match {summary['exact_match']:.3f}" + "".join(
        f", {label} {summary[key]:.1f}" for key, label in (("chrf", "chrF"), ("bleu", "BLEU")) if key in summary)
    say(f"answered {summary['examples']} held-out example(s): {shown}; table in {run_dir / 'samples.md'}")
