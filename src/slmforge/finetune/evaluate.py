"""Answer held-out examples by greedy generation and compare with the references: exact match and
chrF (sacrebleu, when installed; BLEU too for translation), plus a table of prompts, references and
outputs a person can read. Encoder-decoders translate their held-out pairs in padded batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmforge.fileio import write_text_atomic
from slmforge.finetune.templates import Encoded, EncodedPair
from slmforge.inference.generate import SamplingConfig, generate_ids


@torch.no_grad()
def answer(model: nn.Module, example: Encoded, stop_id: int | None, max_new_tokens: int, tokenizer) -> str:
    """The model's greedy answer to an example's prompt (its tokens up to the answer)."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(example.ids[:example.prompt_len], dtype=torch.long, device=device)[None]
    room = model.cfg.max_seq_len - prompt.shape[1]
    sampling = SamplingConfig(max_new_tokens=max(1, min(max_new_tokens, room)), temperature=0.0)
    tokens = generate_ids(model, prompt, sampling, eos_id=stop_id)[0, prompt.shape[1]:].tolist()
    if stop_id is not None and stop_id in tokens:
        tokens = tokens[:tokens.index(stop_id)]
    return tokenizer.decode(tokens)


@torch.no_grad()
def answers(model: nn.Module, examples: list[Encoded], stop_id: int | None, max_new_tokens: int, tokenizer,
            batch_size: int = 16) -> list[str]:
    """The model's greedy answers to the examples' prompts, batched (prompts of different lengths
    share a batch) through the inference engine: the answer of each equals `answer` of it alone."""
    from slmforge.inference import Engine, SamplingParams

    prompts = [torch.as_tensor(e.ids[:e.prompt_len]).tolist() for e in examples]
    if not prompts:
        return []
    params = [SamplingParams(max_new_tokens=max(1, min(max_new_tokens, model.cfg.max_seq_len - len(p))),
                             temperature=0.0, stop_token_ids=[stop_id] if stop_id is not None else [])
              for p in prompts]
    completions = Engine(model, max_batch=min(batch_size, len(prompts))).generate(prompts, params)
    return [tokenizer.decode(c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids) for c in completions]


def chrf(outputs: list[str], references: list[str]) -> float | None:
    """Corpus chrF (0-100) by sacrebleu; None where sacrebleu is not installed."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        return None
    return CHRF().corpus_score(outputs, [references]).score


def bleu(outputs: list[str], references: list[str]) -> float | None:
    """Corpus BLEU (0-100, sacrebleu's default 13a tokenization); None without sacrebleu."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        return None
    return BLEU().corpus_score(outputs, [references]).score


def generation_eval(model: nn.Module, examples: list[Encoded], tokenizer, stop_id: int | None,
                    max_new_tokens: int, translate: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({"examples", "exact_match", "chrf", "bleu" (translate)}, per-example rows) over `examples`."""
    was_training = model.training
    model.eval()
    rows = []
    for example, output in zip(examples, answers(model, examples, stop_id, max_new_tokens, tokenizer)):
        prompt = tokenizer.decode(example.ids[:example.prompt_len].tolist(), skip_special=False)
        rows.append(_row(example.where, prompt, example.answer, output))
    model.train(was_training)
    return _summary(rows, translate), rows


def pair_generation_eval(model: nn.Module, pairs: list[EncodedPair], tokenizer, max_new_tokens: int,
                         batch_size: int = 16) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An encoder-decoder's greedy translations of `pairs`' sources, in padded batches: exact match,
    chrF and BLEU against the references, and per-pair rows."""
    from slmforge.inference.seq2seq import Seq2SeqConfig
    from slmforge.inference.translate import translate_ids

    was_training = model.training
    model.eval()
    cfg = Seq2SeqConfig(max_new_tokens=max_new_tokens)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        outputs = translate_ids(model, [p.source.tolist() for p in batch], cfg, tokenizer.eos_id, pad)
        rows += [_row(p.where, p.prompt, p.answer, tokenizer.decode(ids)) for p, ids in zip(batch, outputs)]
    model.train(was_training)
    return _summary(rows, translate=True), rows


def _row(where: str, prompt: str, reference: str, output: str) -> dict[str, Any]:
    return {"where": where, "prompt": prompt, "reference": reference, "output": output,
            "exact": output.strip() == reference.strip()}


def _summary(rows: list[dict[str, Any]], translate: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"examples": len(rows),
                               "exact_match": sum(r["exact"] for r in rows) / max(len(rows), 1)}
    outputs, references = [r["output"] for r in rows], [r["reference"] for r in rows]
    score = chrf(outputs, references)
    if score is not None:
        summary["chrf"] = score
    if translate and (score := bleu(outputs, references)) is not None:
        summary["bleu"] = score
    return summary


def write_samples(rows: list[dict[str, Any]], folder: Path, name: str = "samples") -> None:
    """NAME.jsonl (every field) and NAME.md (a table to read or paste) in `folder`."""
    write_text_atomic(folder / f"{name}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| example | prompt | reference | output | exact |", "|---|---|---|---|---|"]
    lines += [f"| {cell(r['where'])} | {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['output'])} | "
              f"{'yes' if r['exact'] else 'no'} |" for r in rows]
    write_text_atomic(folder / f"{name}.md", "\n".join(lines) + "\n")


def evaluate_example_file(run, path: str, batch_size: int, samples: int, max_new_tokens: int
                          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`slmforge eval RUN --examples FILE`: a fine-tuned run's loss on the answers of FILE's examples
    (formatted with the run's own template and field names; an encoder-decoder's translation pairs as
    it trained on them) and its generated answers to the first `samples` of them (with BLEU and chrF
    for translation)."""
    from slmforge import config as config_io
    from slmforge.errors import SlmforgeError
    from slmforge.finetune.config import ExamplesConfig
    from slmforge.finetune.examples import Skipped, read_examples
    from slmforge.finetune.loader import ExampleLoader, PairLoader
    from slmforge.finetune.templates import ExampleEncoder, PairEncoder, choose_template, encode_examples
    from slmforge.objectives import mean_loss, summarize
    from slmforge.objectives.clm import CausalLM
    from slmforge.objectives.seq2seq import Seq2Seq
    from slmforge.tokenizer.chat import tokenizer_chat_template

    if getattr(run.model.cfg, "has_classifier", False):  # classify / tag: labels, not generated answers
        from slmforge.finetune.classify import evaluate_label_file

        return evaluate_label_file(run, path, batch_size), []
    settings = run.info.config_section("finetune")
    if run.info.finetune is None or settings is None:
        raise SlmforgeError(f"{run.step_dir}: not made by `slmforge finetune`, so it has no example format; "
                            f"evaluate it with --data or --text")
    cfg = config_io.from_dict(ExamplesConfig, {**settings, "train_files": [path], "val_files": []}, "finetune")
    tokenizer = run.tokenizer()
    skipped = Skipped()
    seq_len = run.info.seq_len or run.model.cfg.max_seq_len
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if run.kind == "encoder-decoder":  # translation pairs: source -> encoder, target -> decoder
        encoder = PairEncoder(tokenizer)
        examples = encode_examples(read_examples([path], cfg, skipped), encoder, seq_len, cfg.on_bad_example,
                                   skipped, "the run's seq_len")
        objective = Seq2Seq()
        loader = PairLoader(examples, batch_size, pad_id=pad_id, shuffle=False, training=False) if examples else None
    else:
        template = tokenizer_chat_template(tokenizer)
        choice = choose_template(cfg.task, "tokenizer" if template else cfg.chat_template, template)
        encoder = ExampleEncoder(tokenizer, choice, cfg.task)
        examples = encode_examples(read_examples([path], cfg, skipped), encoder, seq_len + 1, cfg.on_bad_example,
                                   skipped)
        objective = CausalLM()
        loader = (ExampleLoader(examples, seq_len + 1, batch_size, packing=True, pad_id=pad_id, shuffle=False,
                                training=False) if examples else None)
    if not examples:
        raise SlmforgeError(f"{path}: no usable examples ({skipped.summary() or 'empty'})")
    means, tokens = mean_loss(run.model, objective, loader.epoch_batches(), run.device)
    row: dict[str, Any] = {**summarize(means, None), "tokens": tokens, "examples_file": path,
                           "skipped": skipped.total}
    sample_rows: list[dict[str, Any]] = []
    if samples:
        if run.kind == "encoder-decoder":
            summary, sample_rows = pair_generation_eval(run.model, examples[:samples], tokenizer, max_new_tokens,
                                                        batch_size)
        else:
            summary, sample_rows = generation_eval(run.model, examples[:samples], tokenizer, encoder.stop_id,
                                                   max_new_tokens, translate=cfg.task == "translate")
        row.update({"answered": summary["examples"], **{k: v for k, v in summary.items() if k != "examples"}})
    return row, sample_rows
