"""Answer held-out examples by greedy generation and compare with the references: exact match and
chrF (sacrebleu, when installed), plus a table of prompts, references and outputs a person can read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmforge.fileio import write_text_atomic
from slmforge.finetune.templates import Encoded
from slmforge.generate import SamplingConfig, generate_ids


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


def chrf(outputs: list[str], references: list[str]) -> float | None:
    """Corpus chrF (0-100) by sacrebleu; None where sacrebleu is not installed."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        return None
    return CHRF().corpus_score(outputs, [references]).score


def generation_eval(model: nn.Module, examples: list[Encoded], tokenizer, stop_id: int | None,
                    max_new_tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({"examples", "exact_match", "chrf"}, per-example rows) over `examples`."""
    was_training = model.training
    model.eval()
    rows = []
    for example in examples:
        output = answer(model, example, stop_id, max_new_tokens, tokenizer)
        prompt = tokenizer.decode(example.ids[:example.prompt_len].tolist(), skip_special=False)
        rows.append({"where": example.where, "prompt": prompt, "reference": example.answer, "output": output,
                     "exact": output.strip() == example.answer.strip()})
    model.train(was_training)
    summary: dict[str, Any] = {"examples": len(rows),
                               "exact_match": sum(r["exact"] for r in rows) / max(len(rows), 1)}
    score = chrf([r["output"] for r in rows], [r["reference"] for r in rows])
    if score is not None:
        summary["chrf"] = score
    return summary, rows


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
    (formatted with the run's own template and field names) and its generated answers to the first
    `samples` of them."""
    from slmforge import config as config_io
    from slmforge.errors import SlmforgeError
    from slmforge.finetune.config import ExamplesConfig
    from slmforge.finetune.examples import Skipped, read_examples
    from slmforge.finetune.loader import ExampleLoader
    from slmforge.finetune.templates import ExampleEncoder, choose_template, encode_examples
    from slmforge.objectives import mean_loss, summarize
    from slmforge.objectives.clm import CausalLM
    from slmforge.tokenizer.chat import tokenizer_chat_template

    finetuned = run.meta.get("finetune")
    settings = (run.meta.get("config") or {}).get("finetune")
    if not finetuned or not isinstance(settings, dict):
        raise SlmforgeError(f"{run.step_dir}: not made by `slmforge finetune`, so it has no example format; "
                            f"evaluate it with --data or --text")
    cfg = config_io.from_dict(ExamplesConfig, {**settings, "train_files": [path], "val_files": []}, "finetune")
    tokenizer = run.tokenizer()
    template = tokenizer_chat_template(tokenizer)
    choice = choose_template(cfg.task, "tokenizer" if template else cfg.chat_template, template)
    encoder = ExampleEncoder(tokenizer, choice, cfg.task)
    skipped = Skipped()
    limit = run.meta.get("seq_len", run.model.cfg.max_seq_len) + 1
    examples = encode_examples(read_examples([path], cfg, skipped), encoder, limit, cfg.on_bad_example, skipped)
    if not examples:
        raise SlmforgeError(f"{path}: no usable examples ({skipped.summary() or 'empty'})")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = ExampleLoader(examples, limit, batch_size, packing=True, pad_id=pad_id, shuffle=False, training=False)
    means, tokens = mean_loss(run.model, CausalLM(), loader.epoch_batches(), run.device)
    row: dict[str, Any] = {**summarize(means, None), "tokens": tokens, "examples_file": path,
                           "skipped": skipped.total}
    sample_rows: list[dict[str, Any]] = []
    if samples:
        summary, sample_rows = generation_eval(run.model, examples[:samples], tokenizer, encoder.stop_id,
                                               max_new_tokens)
        row.update({"answered": summary["examples"], **{k: v for k, v in summary.items() if k != "examples"}})
    return row, sample_rows
