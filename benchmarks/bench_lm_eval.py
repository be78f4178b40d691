"""lm-evaluation-harness speed: slmforge's backend (`slmforge eval RUN --tasks ...`) against lm-eval's own
HF backend (`HFLM(pretrained=exported folder)`) on the same model and the same local tasks.

    python -m benchmarks.bench_lm_eval                        # llama-tiny shape, ~2 min on 2 busy cores
    python -m benchmarks.bench_lm_eval --preset gemma3-tiny --questions 64 --docs 16 --rounds 5

A random model of the preset's shape (vocabulary: a byte-level BPE trained here on synthetic Hindi,
Assamese and English text) is saved as a run and exported with `export_hf`. Two local tasks in
lm-eval's YAML (data in JSONL, no network): a Belebele-like multiple choice (a passage, a question and
four answers of a few words) and a perplexity task (loglikelihood_rolling over documents longer than
the context). Measured, each side in turn (alternating who goes first; median of --rounds):

- end to end: `lm_eval.simple_evaluate` over both tasks (request building and metrics included);
- backend only: the same requests answered by each LM: all of them, then the multiple-choice
  (loglikelihood) and the perplexity (loglikelihood_rolling) requests apart.

Wall time with process CPU time beside it, and the ratio HFLM / slmforge (above 1: slmforge faster).
The two sides' log-likelihoods are compared request by request (largest difference printed).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from benchmarks.common import interleave

SYLLABLES = {
    "hi": ["क", "का", "कि", "भा", "र", "त", "ष", "ा", "न", "दी", "ल", "ग", "म", "स", "प", "है", "घर"],
    "as": ["অ", "ক", "কা", "কি", "গ", "ঘৰ", "নদী", "মা", "নু", "হ", "ভা", "ষা", "ৰ", "ল", "স", "ত", "প"],
    "en": ["th", "e", "ri", "ver", "tr", "ee", "peo", "ple", "lan", "gu", "age", "bo", "ok", "s", "in", "g"],
}


def words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES[lang]) for _ in range(rng.randint(1, 4)))
            for lang in SYLLABLES for _ in range(count)]


def make_tokenizer(folder: Path, vocab: int, rng: random.Random) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from slmforge.tokenizer import Tokenizer as SlmforgeTokenizer

    lexicon = words(rng, 1500)
    texts = [" ".join(rng.choice(lexicon) for _ in range(40)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    SlmforgeTokenizer(tok, {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}).save(folder)


def make_run(root: Path, preset: str, seed: int) -> tuple[Path, Path]:
    """A run folder (random weights of the preset's shape, our tokenizer) and its HF export."""
    from slmforge.checkpoint.writing import save_checkpoint
    from slmforge.interop import export_hf
    from slmforge.models import DecoderConfig, build_model
    from slmforge.tokenizer import load_tokenizer

    vocab = DecoderConfig.from_name(preset).vocab_size
    make_tokenizer(root / "run" / "tokenizer", vocab, random.Random(seed))
    size = load_tokenizer(root / "run" / "tokenizer").vocab_size
    model = build_model(DecoderConfig.from_name(preset, vocab_size=size), seed=seed)
    save_checkpoint(root / "run", 1, model)
    return root / "run", export_hf(root / "run", root / "hf")


def make_tasks(folder: Path, questions: int, docs: int, rng: random.Random) -> list[str]:
    """A Belebele-like multiple-choice task and a perplexity task, as lm-eval YAML over local JSONL."""
    lexicon = words(rng, 400)
    sentence = lambda n: " ".join(rng.choice(lexicon) for _ in range(n))  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"passage": sentence(rng.randint(25, 45)), "question": sentence(8),
             "answers": [sentence(rng.randint(2, 6)) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(questions)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    texts = [{"text": sentence(rng.randint(120, 200))} for _ in range(docs)]
    (folder / "ppl.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in texts), encoding="utf-8")
    (folder / "bench_mc.yaml").write_text(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{answers}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""", encoding="utf-8")
    (folder / "bench_ppl.yaml").write_text(f"""task: bench_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'ppl.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""", encoding="utf-8")
    return ["bench_mc", "bench_ppl"]


def requests_of(results: dict) -> dict[str, list]:
    """The requests simple_evaluate made, by type, as lm-eval Instances."""
    from lm_eval.api.instance import Instance

    out: dict[str, list] = {"loglikelihood": [], "loglikelihood_rolling": []}
    for task, samples in results["samples"].items():
        kind = "loglikelihood_rolling" if results["configs"][task]["output_type"] == "loglikelihood_rolling" \
            else "loglikelihood"
        for sample in samples:
            for args in sample["arguments"]:
                out[kind].append(Instance(kind, {}, tuple(args), 0))
    return out


def largest_difference(ours: list, theirs: list) -> float:
    first = lambda x: x[0] if isinstance(x, (tuple, list)) else x  # noqa: E731
    return max((abs(first(a) - first(b)) for a, b in zip(ours, theirs)), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-tiny", help="decoder preset for the model's shape")
    parser.add_argument("--questions", type=int, default=48, help="multiple-choice questions (4 answers each)")
    parser.add_argument("--docs", type=int, default=12, help="perplexity documents (each > the context)")
    parser.add_argument("--batch-size", type=int, default=8, help="both sides' batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from slmforge.checkpoint.reading import open_run
    from slmforge.eval.harness import backend_for, lm_eval_version, run_tasks, task_manager

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run, exported = make_run(root, args.preset, args.seed)
        names = make_tasks(root / "tasks", args.questions, args.docs, random.Random(args.seed + 1))
        manager = task_manager([str(root / "tasks")])
        ours = backend_for(open_run(run), batch_size=args.batch_size)
        theirs = HFLM(pretrained=str(exported), batch_size=args.batch_size, device="cpu")

        def evaluate(lm):
            return lambda: run_tasks(lm, names, manager=manager, log_samples=True)

        first = evaluate(ours)()
        requests = requests_of(first)
        differences = {kind: largest_difference(getattr(ours, kind)(reqs, disable_tqdm=True),
                                                getattr(theirs, kind)(reqs, disable_tqdm=True))
                       for kind, reqs in requests.items()}
        device = torch.device("cpu")
        end_to_end = interleave({"slmforge": evaluate(ours), "lm-eval HFLM": evaluate(theirs)}, args.rounds, device)

        def backend(lm, kinds):
            return lambda: [getattr(lm, kind)(requests[kind], disable_tqdm=True) for kind in kinds]

        measured = [("end to end (simple_evaluate)", end_to_end)]
        for title, kinds in (("backend only, all requests", list(requests)),
                             ("backend only, multiple choice (loglikelihood)", ["loglikelihood"]),
                             ("backend only, perplexity (loglikelihood_rolling)", ["loglikelihood_rolling"])):
            measured.append((title, interleave({"slmforge": backend(ours, kinds), "lm-eval HFLM": backend(theirs, kinds)},
                                               args.rounds, device)))

        cfg = ours.model.cfg
        counts = {kind: len(reqs) for kind, reqs in requests.items()}
        print(f"\nlm-eval {lm_eval_version()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
              f"{args.preset}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
              f"context {cfg.max_seq_len}; batch {args.batch_size}; requests {counts}")
        print(f"largest |log-likelihood difference| per request: "
              + ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))
        figures = {}
        for title, timings in measured:
            ours_t, theirs_t = timings["slmforge"], timings["lm-eval HFLM"]
            wall = theirs_t.median_wall / ours_t.median_wall
            cpu = theirs_t.median_cpu / ours_t.median_cpu
            print(f"\n{title}")
            for name, t in timings.items():
                rounds = ", ".join(f"{w:.2f}" for w in t.wall)
                print(f"  {name:<14} wall {t.median_wall:7.2f} s   cpu {t.median_cpu:7.2f} s   (rounds {rounds})")
            print(f"  HFLM / slmforge: {wall:.2f}x wall, {cpu:.2f}x cpu")
            figures[title] = {"slmforge_wall": ours_t.median_wall, "slmforge_cpu": ours_t.median_cpu,
                              "hflm_wall": theirs_t.median_wall, "hflm_cpu": theirs_t.median_cpu,
                              "ratio_wall": wall, "ratio_cpu": cpu,
                              "rounds": {n: t.wall for n, t in timings.items()}}
        if args.out:
            args.out.write_text(json.dumps({"preset": args.preset, "requests": counts, "batch_size": args.batch_size,
                                            "threads": torch.get_num_threads(), "lm_eval": lm_eval.__version__
                                            if hasattr(lm_eval, "__version__") else lm_eval_version(),
                                            "differences": differences, "figures": figures,
                                            "median_of": args.rounds}, indent=2))


if __name__ == "__main__":
    main()
