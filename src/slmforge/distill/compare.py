"""Teacher and student side by side at the end of `slmforge distill`: per-language loss and
perplexity (bits per byte for causal LMs, which compares a 250k-vocabulary teacher with a small-
vocabulary student), parameters, size on disk and forward tokens/s, each model with its own
tokenizer. Written to run/distill_report.json and, as rows, to the final checkpoint's eval.json."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from slmforge import config as config_io
from slmforge.checkpoint.reading import SHARDED, WEIGHTS, is_sharded_checkpoint, open_run, sharded_tensors, write_eval_report
from slmforge.distill.config import DistillRunConfig
from slmforge.distill.teacher import is_hf_folder, load_teacher
from slmforge.errors import SlmforgeError
from slmforge.eval.evaluate import evaluate_documents, print_table, read_documents, run_objective
from slmforge.fileio import write_json_atomic
from slmforge.models import family
from slmforge.objectives import ObjectiveConfig, build_objective


def weights_bytes(path: Path) -> int:
    """Bytes of a model's weights: a step folder's model.safetensors (or, sharded, its model tensors),
    or an HF folder's shards."""
    if is_sharded_checkpoint(path):
        return sum(shape.numel() * dtype.itemsize for shape, dtype in sharded_tensors(path / SHARDED, "model").values())
    if (path / WEIGHTS).is_file():
        path = path / WEIGHTS
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


@torch.no_grad()
def forward_rate(model, vocab_size: int, device: torch.device, seq_len: int, rounds: int = 3) -> float:
    """Tokens/s of the model's forward pass on a fixed random batch (median of `rounds`)."""
    ids = torch.randint(0, vocab_size, (4, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    extra = {"decoder_input_ids": ids} if family(model.cfg).kind == "encoder-decoder" else {}
    model(ids, **extra)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model(ids, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def compare_with_teacher(run_dir: Path, cfg: DistillRunConfig, device: torch.device) -> dict:
    student = open_run(run_dir, device)
    tokenizer = student.tokenizer()
    teacher = load_teacher(cfg.distill.teacher, device, "float32", tokenizer)
    if student.info.objective is None:
        raise SlmforgeError(f"{student.info.path}: records no objective; it was not made by `slmforge distill`")
    objective_cfg = config_io.parse(ObjectiveConfig, student.info.objective, "objective")
    sides = {
        "student": (student.model, tokenizer, run_objective(student, tokenizer),
                    weights_bytes(student.step_dir)),
        "teacher": (teacher.model, teacher.tokenizer,
                    build_objective(objective_cfg, family(teacher.model.cfg).kind, teacher.model.cfg.family,
                                    teacher.tokenizer, where=cfg.distill.teacher),
                    weights_bytes(_teacher_weights(Path(cfg.distill.teacher)))),
    }
    seq_len = cfg.train.seq_len
    report, rows = {}, {}
    for side, (model, side_tokenizer, objective, size) in sides.items():
        model.eval()
        entry = {"parameters": sum(p.numel() for p in model.parameters()), "weights_mb": size / 2**20,
                 "vocab_size": side_tokenizer.vocab_size,
                 "forward_tokens_per_s": forward_rate(model, side_tokenizer.vocab_size, device, seq_len)}
        for lang, path in cfg.distill.eval_texts.items():
            result = evaluate_documents(model, objective, side_tokenizer, read_documents(path), seq_len, path,
                                        add_bos=student.info.add_bos)
            entry[lang] = result
            rows[lang if side == "student" else f"teacher {lang}"] = {**result, "text": path, "model": side}
        report[side] = entry
    s, t = report["student"], report["teacher"]
    report["compression"] = t["parameters"] / max(s["parameters"], 1)
    write_json_atomic(run_dir / "distill_report.json", report)
    if rows:
        write_eval_report(rows, student.step_dir / "eval.json")
        print_table(rows)
    return report


def _teacher_weights(path: Path) -> Path:
    if is_hf_folder(path):
        return path
    from slmforge.checkpoint.reading import resolve_checkpoint

    return resolve_checkpoint(path)
