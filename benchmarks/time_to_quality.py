"""python -m benchmarks.time_to_quality [--model decoder|encoder] [--shape tiny|issue] [--steps N] [--seeds 3]
[--recipes adamw,muon-wsd] [--device cpu|cuda] [--threads N] [--reuse-baseline] [--out DIR]

Issue 25: how many tokens and CPU seconds slmforge's pretraining needs to reach the validation loss a seed's
transformers `Trainer` set-up reaches, from the same weights on the same windows in the same order.

Both sides, per seed:
  - one model config; our model is built with `build_model(cfg, seed)` (what `slmforge pretrain` builds), and
    the baseline's transformers model is that model exported with slmforge's export code
    (`state_dict_to_hf` / `config_to_hf`) and loaded with `AutoModelForCausalLM` / `AutoModelForMaskedLM`:
    identical starting weights (checked: both start at the same validation loss);
  - the same training windows in the same order: `WindowLoader` over the `ShardSet` with the run's seed (what
    pretrain reads), collated once by the slmforge objective (for the MLM side: slmforge's own 15% masks on
    both sides, so the comparison is about the optimizer and the loop, not the masking) and handed to the
    `Trainer` as a Dataset in that order, shuffling off;
  - the same evaluation code: every validation point runs `objectives.base.mean_loss` on the same val
    windows with our model class (the baseline's weights are copied back into it with slmforge's import
    plan, `plan_import`); bits per byte for decoders;
  - CPU seconds = `time.process_time()` of the training loop only (evaluations are excluded; process-wide,
    so every thread counts).

Baseline optimizers (the seeds'): decoder, seed 003: AdamW betas (0.9, 0.95), wd 0.1, eps 1e-9, lr 3e-4,
linear warmup over 10% of the run (seed 003's 8,000 of its run, scaled down), cosine to 0, clip 1.0;
encoder, seed 001: AdamW lr 5e-4, wd 0.01, 6% linear warmup then linear decay to 0, clip 1.0.

slmforge's side is `slmforge.train.pretrain.pretrain` with a candidate recipe: a name in RECIPES, optionally
followed by `+section.field=value` overrides of the pretrain config (values read as TOML: numbers, true,
"strings"), e.g. `muon-wsd+optim.muon_lr=0.01+schedule.cooldown_ratio=0.3`.

--reuse-baseline reads a seed's baseline curve from an earlier run in the same --out made with the same
settings (its tokens are exact; its CPU seconds are from that earlier run, so only token ratios compare).

Writes DIR/curves.png, DIR/results.json, DIR/table.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

# slmforge's side: the [optim] / [schedule] tables of each candidate recipe (the rest is shared).
RECIPES: dict[str, dict] = {
    "adamw": {"optim": {}, "schedule": {}},  # slmforge's defaults: AdamW lr 3e-4, betas .9/.95, wd .1, cosine
    "adamw-3e-3": {"optim": {"lr": 3e-3}, "schedule": {}},  # the quickstart's lr
    "muon-wsd": {"optim": {"kind": "muon"}, "schedule": {"decay": "wsd"}},
    "muon-wsd-3e-3": {"optim": {"kind": "muon", "lr": 3e-3}, "schedule": {"decay": "wsd"}},
    # Encoders only: muon-wsd with ModernBERT's 30% training masks (validation stays on 15% masks) and
    # AdamW's part (embeddings, MLM head, norms) at 2e-3; the first to reach seed 001's loss in <= 0.5x its
    # tokens (docs/benchmarks.md, "Time to quality").
    "muon-wsd-mlm30": {"optim": {"kind": "muon", "lr": 2e-3}, "schedule": {"decay": "wsd"},
                       "objective": {"kind": "mlm", "mask_rate": 0.3}},
}

# Model shapes: tiny (CPU minutes) and the issue's (a ~10M Gemma 3 decoder; seed 001's BERT 10M).
SHAPES: dict[tuple[str, str], dict] = {
    ("decoder", "tiny"): {"preset": "gemma3-tiny"},
    ("decoder", "issue"): {"preset": "gemma3-tiny", "hidden_size": 256, "num_layers": 10, "num_heads": 4,
                           "num_kv_heads": 1, "head_dim": 64, "intermediate_size": 1024,
                           "query_pre_attn_scalar": 64.0, "max_seq_len": 512, "sliding_window": 128},
    ("encoder", "tiny"): {"preset": "bert-tiny"},
    ("encoder", "issue"): {"preset": "bert-10m"},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_quality", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", choices=("decoder", "encoder"), default="decoder")
    p.add_argument("--shape", choices=("tiny", "issue"), default="tiny",
                   help="tiny: gemma3-tiny / bert-tiny; issue: a ~10M Gemma 3 decoder / bert-10m (seed 001)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--evals", type=int, default=10, help="validation points per run (default 10)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per point (default 8)")
    p.add_argument("--recipes", default="adamw,muon-wsd",
                   help=f"slmforge recipes, comma-separated, of {', '.join(RECIPES)} (default adamw,muon-wsd)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--reuse-baseline", action="store_true",
                   help="read each seed's baseline from an earlier run in --out with the same settings")
    p.add_argument("--data", default="", help="prepared data folder to reuse (default: made under --out)")
    p.add_argument("--out", default="benchmarks/results/time_to_quality")
    args = p.parse_args(argv)
    for spec in args.recipes.split(","):
        try:
            recipe_tables(spec)
        except SystemExit as error:
            p.error(str(error))
    return args


# ---------------------------------------------------------------------------------------------- data

def prepare(out: Path, vocab_size: int) -> Path:
    """Built-in corpus -> BPE tokenizer -> token shards with a val split (as the quickstart does); cached."""
    from slmforge import config
    from slmforge.data.demo_corpus import build_demo_corpus
    from slmforge.data.prepare import DataConfig, prepare_data
    from slmforge.tokenizer import TokenizerConfig, train_tokenizer

    data = out / "data"
    if (data / "manifest.json").is_file():
        return data
    files = build_demo_corpus(out / "corpus")
    tok_cfg = config.from_dict(TokenizerConfig, {"kind": "bpe", "vocab_size": vocab_size,
                                                  "inputs": [str(p) for p in files.values()]}, "tokenizer")
    train_tokenizer(tok_cfg, out / "tokenizer")
    prepare_data(config.from_dict(DataConfig, {
        "sources": [{"path": str(p), "lang": lang} for lang, p in files.items()],
        "tokenizer": str(out / "tokenizer"), "out": str(data), "val_fraction": 0.05}, "data"))
    return data


def recipe_tables(spec: str) -> dict:
    """The config tables of a recipe spec: RECIPES[name] plus its `+section.field=value` overrides."""
    from slmforge.config import tomllib  # tomli on Python 3.10

    name, *overrides = spec.split("+")
    if name not in RECIPES:
        raise SystemExit(f"--recipes: unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    tables = {section: dict(values) for section, values in RECIPES[name].items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--recipes: override {item!r} in {spec!r} is not section.field=value")
        tables.setdefault(section, {})[field] = tomllib.loads(f"v = {value}")["v"]
    return tables


def pretrain_config(args, data: Path, seed: int, run_dir: Path, recipe: dict | None = None):
    from slmforge import config
    from slmforge.data.shards import ShardSet
    from slmforge.train.config import PretrainConfig

    recipe = recipe or {"optim": {}, "schedule": {}}
    model = {**SHAPES[(args.model, args.shape)], "vocab_size": ShardSet(data, "train").vocab_size}
    model["max_seq_len"] = max(args.seq_len, model.get("max_seq_len", 0))
    model.update(recipe.get("model", {}))
    every = max(1, args.steps // args.evals)
    extra = {k: v for k, v in recipe.items() if k not in ("model", "optim", "schedule", "train")}
    return config.from_dict(PretrainConfig, {
        "model": model, "optim": recipe.get("optim", {}), "schedule": recipe.get("schedule", {}), **extra,
        # a recipe may change max_steps (e.g. a batch warmup run for more steps at the same tokens)
        "train": {"out_dir": str(run_dir), "data": str(data), "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "max_steps": args.steps, "eval_every": every,
                  "eval_batches": args.eval_batches, "save_every": 0, "save_best": False, "keep_last": 1,
                  "log_every": max(1, args.steps // 10), "seed": seed, "device": args.device,
                  "precision": "fp32", "resume": "never", **recipe.get("train", {})},
    })


class Evaluator:
    """One validation for every side: mean_loss of our model class on the same val windows."""

    def __init__(self, cfg, data: Path, device: torch.device):
        from slmforge import config as config_io
        from slmforge.data.loader import WindowLoader
        from slmforge.data.shards import ShardSet, manifest_tokenizer_dir
        from slmforge.models.registry import family
        from slmforge.objectives import DEFAULT_FOR_KIND, ObjectiveConfig, build_objective
        from slmforge.objectives.losses import HeadLoss
        from slmforge.tokenizer import load_tokenizer

        fam = family(cfg.model)
        shards = ShardSet(data, "train")
        self.tokenizer = load_tokenizer(manifest_tokenizer_dir(data, shards.manifest))
        objective_cfg = config_io.parse(ObjectiveConfig, {"kind": DEFAULT_FOR_KIND[fam.kind]}, "objective")
        self.objective = build_objective(objective_cfg, fam.kind, fam.name, self.tokenizer)
        self.objective.use_head_loss(HeadLoss())
        self.window = self.objective.window_tokens(cfg.train.seq_len)
        val = ShardSet(data, "val")
        self.bytes_per_token = val.bytes_per_token
        self.loader = WindowLoader(val, cfg.train.seq_len, cfg.train.batch_size, shuffle=False, training=False,
                                   window=self.window)
        self.batches = cfg.train.eval_batches
        self.device = device

    def __call__(self, model) -> dict[str, float]:
        from slmforge.objectives.base import mean_loss, summarize

        means, _ = mean_loss(model, self.objective, self.loader.epoch_batches(self.batches), self.device)
        return summarize(means, self.bytes_per_token if self.objective.bits_per_byte else None)


# ---------------------------------------------------------------------------------------------- baseline

def export_to_hf(model, cfg, tokenizer_dir: Path, hf_dir: Path) -> None:
    from safetensors.torch import save_file

    from slmforge.interop.export import special_token_ids, write_json
    from slmforge.models.hf import config_to_hf, state_dict_to_hf

    hf_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_to_hf(cfg, model.state_dict(), torch.float32), hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    write_json(hf_dir / "config.json", config_to_hf(cfg, dtype="float32", **special_token_ids(tokenizer_dir)))


def into_ours(hf_model, cfg, ours):
    """Copy the transformers model's weights into our model class with slmforge's import plan."""
    from slmforge.models.hf import plan_import

    available = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    hf_state = hf_model.state_dict()
    targets = ours.state_dict()
    plan = plan_import(cfg, {k: v.shape for k, v in targets.items()}, available, False, "transformers model")
    with torch.no_grad():
        for name, stored in plan.items():
            if isinstance(stored, tuple):
                src, start, stop = stored
                targets[name].copy_(hf_state[src][start:stop])
            else:
                targets[name].copy_(hf_state[stored])
    return ours


def run_baseline(args, cfg, data: Path, seed: int, evaluator: Evaluator, work: Path) -> list[dict]:
    import transformers
    from torch.utils.data import Dataset, SequentialSampler

    from slmforge.data.loader import WindowLoader
    from slmforge.data.shards import ShardSet, manifest_tokenizer_dir
    from slmforge.models.registry import build_model, family

    transformers.logging.set_verbosity_error()
    fam = family(cfg.model)
    shards = ShardSet(data, "train")
    init = build_model(cfg.model, device="cpu", seed=seed)  # what pretrain builds for this seed
    hf_dir = work / f"hf-init-{seed}"
    export_to_hf(init, cfg.model, manifest_tokenizer_dir(data, shards.manifest), hf_dir)
    auto = transformers.AutoModelForCausalLM if fam.kind == "decoder" else transformers.AutoModelForMaskedLM
    hf_model = auto.from_pretrained(hf_dir, dtype=torch.float32)
    device = torch.device(args.device)
    ours = build_model(cfg.model, device=device, seed=None)

    # The windows pretrain reads, in its order, collated by the objective with the run's seed.
    loader = WindowLoader(shards, cfg.train.seq_len, cfg.train.batch_size, seed=seed, window=evaluator.window)
    rows = []
    for _ in range(cfg.train.max_steps):
        raw = loader.next_batch()
        if fam.kind == "decoder":  # the whole window: transformers shifts labels itself -> the same targets
            tokens = raw["tokens"].long()
            rows += [{"input_ids": t, "labels": t} for t in tokens]
        else:
            batch = evaluator.objective.collate(raw, seed)
            rows += [{"input_ids": i, "labels": t, "attention_mask": torch.ones_like(i)}
                     for i, t in zip(batch["input_ids"], batch["targets"])]

    class Windows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    steps = cfg.train.max_steps
    if fam.kind == "decoder":  # seed 003
        opt = dict(learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-9, weight_decay=0.1,
                   lr_scheduler_type="cosine", warmup_steps=max(1, round(0.10 * steps)))
    else:  # seed 001
        opt = dict(learning_rate=5e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.01,
                   lr_scheduler_type="linear", warmup_steps=max(1, round(0.06 * steps)))
    targs = transformers.TrainingArguments(
        output_dir=str(work / f"hf-run-{seed}"), per_device_train_batch_size=cfg.train.batch_size, max_steps=steps,
        max_grad_norm=1.0, logging_steps=max(1, steps // 10), save_strategy="no", eval_strategy="no",
        report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=args.device == "cpu", **opt)

    every = cfg.train.eval_every
    points: list[dict] = []
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len

    class Clock(transformers.TrainerCallback):
        start = excluded = 0.0

        def on_train_begin(self, a, state, control, **kw):
            Clock.start = time.process_time()

        def on_step_end(self, a, state, control, model=None, **kw):
            step = state.global_step
            if step % every and step != steps:
                return
            t0 = time.process_time()
            result = evaluator(into_ours(model, cfg.model, ours))
            points.append({"step": step, "tokens": step * tokens_per_step,
                           "cpu_s": t0 - Clock.start - Clock.excluded, **result})
            Clock.excluded += time.process_time() - t0

    # Identical starting weights: the exported model, read back, scores what our init scores.
    start = evaluator(into_ours(hf_model, cfg.model, ours))["loss"]
    expected = evaluator(init.to(device))["loss"]
    if abs(start - expected) > 1e-4:
        raise SystemExit(f"the exported model starts at val loss {start:.6f}, ours at {expected:.6f}")
    trainer = InOrder(model=hf_model, args=targs, train_dataset=Windows(), callbacks=[Clock()])
    trainer.train()
    return points


def baseline_curve(args, cfg, data: Path, seed: int, evaluator: Evaluator, out: Path) -> list[dict]:
    """run_baseline, or with --reuse-baseline its saved curve from an earlier run with the same settings."""
    same = {k: getattr(args, k) for k in ("model", "shape", "steps", "batch_size", "seq_len", "vocab_size",
                                          "evals", "eval_batches", "device", "data")}
    saved = out / f"baseline-{seed}.json"
    if args.reuse_baseline and saved.is_file():
        stored = json.loads(saved.read_text(encoding="utf-8"))
        if stored["settings"] == same:
            return stored["points"]
    points = run_baseline(args, cfg, data, seed, evaluator, out)
    saved.write_text(json.dumps({"settings": same, "points": points}), encoding="utf-8")
    return points


# ---------------------------------------------------------------------------------------------- slmforge

def run_slmforge(args, data: Path, seed: int, recipe: str, evaluator: Evaluator, work: Path) -> list[dict]:
    from slmforge.train import trainer as trainer_mod
    from slmforge.train.pretrain import pretrain

    run_name = recipe.replace("+", "_").replace("=", "-").replace('"', "")
    run_dir = work / f"slmforge-{run_name}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch run from an earlier call: measure afresh
    cfg = pretrain_config(args, data, seed, run_dir, recipe_tables(recipe))
    points: list[dict] = []
    clock = {"start": None, "excluded": 0.0}
    Trainer = trainer_mod.Trainer
    original_step, original_eval = Trainer.train_step, Trainer.evaluate

    def train_step(self):
        if clock["start"] is None:
            clock["start"] = time.process_time()
        return original_step(self)

    def evaluate(self):  # the shared evaluation instead of the trainer's, its time excluded
        t0 = time.process_time()
        result = evaluator(self.model)
        points.append({"step": self.state.step, "tokens": self.state.tokens,
                       "cpu_s": t0 - clock["start"] - clock["excluded"], **result})
        clock["excluded"] += time.process_time() - t0
        return result

    Trainer.train_step, Trainer.evaluate = train_step, evaluate
    try:
        pretrain(cfg)
    finally:
        Trainer.train_step, Trainer.evaluate = original_step, original_eval
    return points


# ---------------------------------------------------------------------------------------------- analysis

def reach(points: list[dict], target: float, key: str) -> float | None:
    """`key` (tokens or cpu_s) at which the validation loss first reaches `target`, linear between points."""
    prev = None
    for p in points:
        if p["loss"] <= target:
            if prev is None or prev["loss"] <= target:
                return float(p[key])
            f = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return prev[key] + f * (p[key] - prev[key])
        prev = p
    return None


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {statistics.stdev(values):.2g}"


def table(results: dict, args) -> str:
    seeds = sorted(results["baseline"])
    lines = ["| side | final val loss | final bpb | tokens to baseline's final | CPU s to baseline's final "
             "| x tokens | x CPU s | reached |",
             "|---|---|---|---|---|---|---|---|"]
    for side in ["baseline", *args.recipes.split(",")]:
        finals, bpbs, toks, cpus, xt, xc, hit = [], [], [], [], [], [], 0
        for s in seeds:
            base = results["baseline"][s]
            target = base[-1]["loss"]
            pts = results[side][s]
            finals.append(pts[-1]["loss"])
            if "bpb" in pts[-1]:
                bpbs.append(pts[-1]["bpb"])
            t, c = reach(pts, target, "tokens"), reach(pts, target, "cpu_s")
            if t is not None:
                hit += 1
                toks.append(t)
                cpus.append(c)
                xt.append(t / base[-1]["tokens"])
                xc.append(c / base[-1]["cpu_s"])
        name = {"baseline": f"transformers Trainer (seed {'003' if args.model == 'decoder' else '001'})"}.get(
            side, f"slmforge {side}")
        lines.append(f"| {name} | {spread(finals)} | {spread(bpbs)} | {spread(toks)} | {spread(cpus)} | "
                     f"{spread(xt)} | {spread(xc)} | {hit}/{len(seeds)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (side, runs) in enumerate(results.items()):
        for j, (seed, pts) in enumerate(sorted(runs.items())):
            label = side if j == 0 else None
            for ax, key in zip(axes, ("tokens", "cpu_s")):
                ax.plot([p[key] for p in pts], [p["loss"] for p in pts], color=colors[i % len(colors)],
                        marker=".", label=label, alpha=0.85)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("CPU seconds of the training loop (process_time)")
    axes[0].set_ylabel("validation loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # pretrain keeps torch's threads as set
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else prepare(out, args.vocab_size)
    device = torch.device(args.device)
    results: dict[str, dict[int, list[dict]]] = {"baseline": {}, **{r: {} for r in args.recipes.split(",")}}
    wall = time.perf_counter()
    for seed in range(args.seeds):
        cfg = pretrain_config(args, data, seed, out / "unused")
        evaluator = Evaluator(cfg, data, device)
        from slmforge.models.registry import build_model

        start = {"step": 0, "tokens": 0, "cpu_s": 0.0, **evaluator(build_model(cfg.model, device=device, seed=seed))}
        base = baseline_curve(args, cfg, data, seed, evaluator, out)
        results["baseline"][seed] = [start, *base]
        print(f"seed {seed} baseline: val loss {start['loss']:.4f} -> {base[-1]['loss']:.4f} "
              f"in {base[-1]['cpu_s']:.1f} CPU s", file=sys.stderr)
        for recipe in args.recipes.split(","):
            pts = run_slmforge(args, data, seed, recipe, evaluator, out)
            results[recipe][seed] = [start, *pts]
            print(f"seed {seed} slmforge {recipe}: val loss -> {pts[-1]['loss']:.4f} "
                  f"in {pts[-1]['cpu_s']:.1f} CPU s", file=sys.stderr)
            # after every run, so an interrupted measurement keeps what it finished
            (out / "partial.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    conditions = (f"{args.model} ({SHAPES[(args.model, args.shape)]['preset']}, shape {args.shape}), {args.steps} steps "
                  f"of {args.batch_size} x {args.seq_len}, seeds 0..{args.seeds - 1}, device {args.device}, "
                  f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                  f"{time.perf_counter() - wall:.0f} s wall")
    text = table(results, args)
    print(f"\n{conditions}\n\n{text}\n")
    (out / "table.md").write_text(f"{conditions}\n\n{text}\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"conditions": conditions, "args": vars(args),
                                                  "results": results}, indent=1), encoding="utf-8")
    plot(results, out / "curves.png", f"time to quality: {args.model} {args.shape}, {args.steps} steps")
    print(f"wrote {out / 'curves.png'}, {out / 'table.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
