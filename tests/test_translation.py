"""Translation: parallel data (`data pairs`), the seq2seq objective, `finetune.task = "translate"` for
encoder-decoders and decoders, exact resume, BLEU/chrF evaluation and `slmforge translate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at_step, untimed, word_level_tokenizer
from safetensors.torch import load_file

from slmforge import config
from slmforge.data.pairs import PairsConfig, make_pairs
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import ExamplesConfig, FinetuneConfig
from slmforge.finetune.examples import parse_example
from slmforge.finetune.loader import PairLoader
from slmforge.finetune.run import finetune
from slmforge.finetune.templates import ExampleEncoder, PairEncoder, choose_template
from slmforge.models import build_model, config_from_dict
from slmforge.objectives.seq2seq import Seq2Seq

# A deterministic "language pair": each source word has one target word (a fixed permutation), and the
# target reverses the word order, so the model must learn both a lexicon and a reordering.
SOURCE_WORDS = [f"s{i}" for i in range(16)]
TARGET_WORDS = [f"t{i}" for i in range(16)]
LEXICON = np.random.default_rng(0).permutation(16)


def cipher_pairs(count: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        words = rng.integers(0, 16, size=rng.integers(3, 8))
        rows.append({"src": " ".join(SOURCE_WORDS[i] for i in words),
                     "tgt": " ".join(TARGET_WORDS[LEXICON[i]] for i in reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def translate_config(tmp_path: Path, *overrides: str, examples: int = 3000):
    tokenizer_dir = tmp_path / "tok"
    if not tokenizer_dir.exists():
        word_level_tokenizer(tokenizer_dir, SOURCE_WORDS + TARGET_WORDS + ["Translate:"])
    train = tmp_path / f"train-{examples}.jsonl"
    if not train.exists():
        write_jsonl(train, cipher_pairs(examples, seed=1))
    val = tmp_path / "val.jsonl"
    if not val.exists():
        write_jsonl(val, cipher_pairs(48, seed=2))
    return config.load(FinetuneConfig, overrides=[
        "model.preset=encdec-tiny", f"finetune.tokenizer={tokenizer_dir}", "finetune.task=translate",
        f'finetune.train_files=["{train}"]', f'finetune.val_files=["{val}"]', "train.seq_len=16",
        "train.batch_size=16", "train.max_steps=20", "train.log_every=10", "train.eval_every=0",
        "train.save_every=10", "optim.lr=3e-3", "schedule.warmup_steps=20", "finetune.eval_samples=48",
        "finetune.max_new_tokens=12", "tracking.backends=[]", "train.device=cpu",
        f"train.out_dir={tmp_path / 'run'}", *overrides])


def held_out(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:06d}" / "eval.json").read_text())["finetune_held_out"]


# ---------------------------------------------------------------- learning the cipher


def test_a_tiny_encoder_decoder_learns_the_cipher_and_translates_files(tmp_path, capsys):
    run = finetune(translate_config(tmp_path, "train.max_steps=300", "train.save_every=300"))
    report = held_out(run, 300)
    assert report["chrf"] >= 90 and report["bleu"] >= 80, report
    samples = (run / "samples.md").read_text()
    assert "| reference | output |" in samples and "s" in samples
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {"prompt", "reference", "output", "exact"} <= set(rows[0])

    # `slmforge translate`: batched, beam search, empty lines kept, the file written whole.
    from slmforge.cli import main

    pairs = cipher_pairs(20, seed=5)
    source = tmp_path / "test.src"
    source.write_text("\n".join([p["src"] for p in pairs[:10]] + [""] + [p["src"] for p in pairs[10:]]) + "\n")
    out = tmp_path / "test.out"
    assert main(["translate", str(run), "--input", str(source), "--out", str(out), "--beams", "3",
                 "--batch-size", "8", "--length-penalty", "0.8"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 21 and lines[10] == ""
    from slmforge.finetune.evaluate import chrf

    outputs = lines[:10] + lines[11:]
    assert chrf(outputs, [p["tgt"] for p in pairs]) >= 90
    assert not list(tmp_path.glob("*.tmp"))
    assert "translate: 21 lines" in capsys.readouterr().err


def test_the_untrained_encoder_decoder_does_not_translate(tmp_path):
    """The control for the test above: the same evaluation after one step at a negligible rate."""
    run = finetune(translate_config(tmp_path, "train.max_steps=1", "optim.lr=1e-9", "train.save_every=1"))
    report = held_out(run, 1)
    assert report["chrf"] < 30 and report["bleu"] < 5 and report["exact_match"] == 0.0, report


# ---------------------------------------------------------------- the objective


def test_a_padded_batch_of_pairs_computes_what_each_pair_alone_computes(tmp_path):
    tokenizer = word_level_tokenizer(tmp_path / "tok", SOURCE_WORDS + TARGET_WORDS)
    cfg = ExamplesConfig(train_files=["x"], task="translate")
    encoder = PairEncoder(tokenizer)
    pairs = [encoder.encode(parse_example(r, cfg, f"row {i}")) for i, r in enumerate(cipher_pairs(6, seed=3))]
    assert len({len(p.source) for p in pairs}) > 1 and len({len(p.target) for p in pairs}) > 1  # padding happens
    model = build_model(config_from_dict({"preset": "encdec-tiny", "vocab_size": tokenizer.vocab_size}), seed=0)
    objective = Seq2Seq()
    batch = objective.collate(PairLoader(pairs, 6, pad_id=tokenizer.pad_id, shuffle=False).next_batch())
    assert batch["real_tokens"] == sum(len(p.source) for p in pairs)
    with torch.no_grad():
        together, _ = objective.loss(model, batch)
    total, count = 0.0, 0
    for pair in pairs:
        alone = objective.collate(PairLoader([pair], 1, pad_id=tokenizer.pad_id, shuffle=False).next_batch())
        with torch.no_grad():
            loss, _ = objective.loss(model, alone)
        total, count = total + loss.item() * len(pair.target), count + len(pair.target)
    assert float(together) == pytest.approx(total / count, rel=1e-5)
    # The target is `words eos`; the source ends in eos too.
    assert pairs[0].target[-1] == tokenizer.eos_id and pairs[0].source[-1] == tokenizer.eos_id


def test_pair_batches_are_bucketed_by_length_and_visit_every_pair_once_per_epoch(tmp_path):
    tokenizer = word_level_tokenizer(tmp_path / "tok", SOURCE_WORDS + TARGET_WORDS)
    cfg = ExamplesConfig(train_files=["x"], task="translate")
    encoder = PairEncoder(tokenizer)
    pairs = [encoder.encode(parse_example(r, cfg, f"row {i}")) for i, r in enumerate(cipher_pairs(803, seed=4))]
    loader = PairLoader(pairs, 8, pad_id=tokenizer.pad_id, seed=1, world_size=2, rank=1)
    other = PairLoader(pairs, 8, pad_id=tokenizer.pad_id, seed=1, world_size=2, rank=0)
    order = loader._epoch_order()
    assert sorted(order.tolist()) == list(range(803)) and order.tolist() == other._epoch_order().tolist()
    unbucketed = PairLoader(pairs, 8, pad_id=tokenizer.pad_id, shuffle=False)
    assert loader.fill > 0.9 > unbucketed.fill
    seen = []
    for _ in range(loader.batches_per_epoch):
        for part in (loader, other):
            seen += part.next_batch()["sample_ids"].tolist()
    assert sorted(seen) == sorted(order[:800].tolist())  # 3 rows make no global batch of 16


# ---------------------------------------------------------------- resume, LoRA, the figure


def test_translation_finetuning_killed_and_resumed_ends_bitwise_equal(tmp_path, monkeypatch):

    common = ("train.max_steps=16", "train.save_every=8", "finetune.eval_samples=0", "model.dropout=0.1")
    straight = finetune(translate_config(tmp_path, *common, f"train.out_dir={tmp_path / 'straight'}", examples=400))
    with crash_at_step(monkeypatch, 11):
        finetune(translate_config(tmp_path, *common, f"train.out_dir={tmp_path / 'resumed'}", examples=400))
    resumed = finetune(translate_config(tmp_path, *common, f"train.out_dir={tmp_path / 'resumed'}", examples=400))
    a = load_file(straight / "checkpoints" / "step-000016" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-000016" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(straight) == untimed(resumed) and len(untimed(straight)) >= 3


def test_lora_on_an_encoder_decoder_trains_adapters_on_both_halves_and_the_figure_overlays_runs(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    base = finetune(translate_config(tmp_path, "train.max_steps=10", f"train.out_dir={tmp_path / 'base'}",
                                     "finetune.eval_samples=0", examples=400))
    lora = finetune(translate_config(tmp_path, f"train.init_from={base}", "lora.rank=4", "train.max_steps=10",
                                     "finetune.eval_samples=4", f"train.out_dir={tmp_path / 'lora'}", examples=400))
    adapter = load_file(lora / "checkpoints" / "step-000010" / "adapter_model.safetensors")
    names = set(adapter)
    assert any(".encoder." in n for n in names) and any(".cross_attn." in n for n in names)
    start = load_file(base / "checkpoints" / "step-000010" / "model.safetensors")
    kept = load_file(lora / "base" / "model.safetensors")
    assert all(torch.equal(start[k], kept[k]) for k in start)  # the base is untouched
    assert "bleu" in held_out(lora, 10)

    # Seed 002's figure: fine-tuning loss from a pretrained start against from scratch, overlaid.
    scratch = finetune(translate_config(tmp_path, "train.max_steps=10", "finetune.eval_samples=0",
                                        f"train.out_dir={tmp_path / 'scratch'}", examples=400))
    from slmforge.report import make_report

    html, markdown = make_report([lora, scratch], tmp_path / "compare.html")
    assert (tmp_path / "compare-loss.png").stat().st_size > 1000
    assert "lora" in markdown.read_text() and "scratch" in markdown.read_text()


# ---------------------------------------------------------------- decoders


def test_decoder_translation_scores_only_the_target_and_translates(tmp_path, capsys):
    tokenizer_dir = tmp_path / "tok"
    base = word_level_tokenizer(tokenizer_dir, SOURCE_WORDS + TARGET_WORDS + ["Translate:"])
    choice = choose_template("translate", "chatml", None)
    from slmforge.finetune.vocab import add_special_tokens

    tokenizer, _ = add_special_tokens(base, choice.added_tokens, choice.source)
    cfg = ExamplesConfig(train_files=["x"], task="translate")
    pair = cipher_pairs(1, seed=7)[0]
    encoded = ExampleEncoder(tokenizer, choice, "translate").encode(parse_example(pair, cfg, "row 0"))
    scored = tokenizer.decode(encoded.ids[encoded.scored].tolist(), skip_special=False).split()
    assert scored == pair["tgt"].split() + ["<|im_end|>"]
    prompt = tokenizer.decode(encoded.ids[:encoded.prompt_len].tolist(), skip_special=False)
    assert "Translate:" in prompt and pair["src"] in prompt and pair["tgt"] not in prompt

    run = finetune(translate_config(tmp_path, "model.preset=test-tiny", "train.seq_len=40", "train.max_steps=4",
                                    "finetune.eval_samples=2", "train.save_every=4", examples=200))
    assert "bleu" in held_out(run, 4)
    from slmforge.cli import main

    source = tmp_path / "one.src"
    source.write_text(pair["src"] + "\n")
    capsys.readouterr()
    assert main(["translate", str(run), "--input", str(source), "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["eval", str(run), "--examples", f"held={tmp_path / 'val.jsonl'}", "--samples", "2", "--json",
                 "--max-new-tokens", "4"]) == 0
    row = json.loads(capsys.readouterr().out)["held"]
    assert row["answered"] == 2 and {"loss", "bleu", "chrf"} <= set(row)
    assert main(["translate", str(run), "--input", str(source), "--beams", "2"]) == 2
    assert "beam search is for encoder-decoders" in capsys.readouterr().err


def test_an_encoder_decoder_refuses_chat_tasks(tmp_path):
    with pytest.raises(SlmforgeError, match="finetune.task: 'chat' is for decoders"):
        finetune(translate_config(tmp_path, "finetune.task=chat"))


# ---------------------------------------------------------------- parallel data


def pairs_config(tmp_path: Path, *sources: dict, **fields) -> PairsConfig:
    data = {"inputs": list(sources), "out": str(tmp_path / "pairs"), "test_size": 0, "val_size": 0, **fields}
    return config.from_dict(PairsConfig, data, "pairs")


def test_filters_and_dedup_count_each_dropped_pair(tmp_path):
    rows = [
        {"de": "ein Hund", "en": "a dog"},                     # kept
        {"de": "ein  Hund ", "en": "a dog"},                   # duplicate (whitespace aside)
        {"de": "", "en": "empty source"},                      # empty
        {"de": "ein Satz", "en": "   "},                       # empty
        {"de": "eins zwei drei vier fünf sechs sieben", "en": "one two three four five six seven"},  # too long (6)
        {"de": "kurz", "en": "much longer than the source"},   # length ratio 5 > 3
        {"de": "eine Katze", "en": "a cat"},                   # kept
        {"de": "eine Katze", "en": "one cat"},                 # kept: another translation is no duplicate
    ]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    tsv = tmp_path / "b.tsv"
    tsv.write_text("der Baum\tthe tree\nein Hund\ta dog\n", encoding="utf-8")  # kept, duplicate across files
    (tmp_path / "c.de").write_text("das Haus\nein Boot\n", encoding="utf-8")
    (tmp_path / "c.en").write_text("the house\n\n", encoding="utf-8")  # kept, empty
    aligned = {"path": str(tmp_path / "c.de"), "tgt_path": str(tmp_path / "c.en")}
    report = make_pairs(pairs_config(tmp_path, {"path": str(jsonl), "src_field": "de", "tgt_field": "en"},
                                     {"path": str(tsv)}, aligned, max_length=6, max_ratio=3.0))
    assert report["read"] == 12
    assert report["dropped"] == {"duplicate": 2, "empty": 3, "too long": 1, "length ratio": 1}
    assert report["kept"] == 5 and report["splits"] == {"test": 0, "val": 0, "train": 5}
    train = [json.loads(line) for line in (tmp_path / "pairs" / "train.jsonl").read_text().splitlines()]
    assert {(r["src"], r["tgt"]) for r in train} == {("ein Hund", "a dog"), ("eine Katze", "a cat"),
                                                     ("eine Katze", "one cat"), ("der Baum", "the tree"),
                                                     ("das Haus", "the house")}
    assert json.loads((tmp_path / "pairs" / "report.json").read_text()) == report
    # Character lengths: the same pairs, another unit.
    chars = make_pairs(pairs_config(tmp_path, {"path": str(tsv)}, min_length=8, length_unit="chars"))
    assert chars["dropped"] == {"too short": 1} and chars["kept"] == 1  # "a dog": 5 characters; "the tree": 8


def test_held_out_splits_are_seeded_disjoint_and_never_share_a_source_with_test(tmp_path):
    rows = [{"src": f"s{i % 40} s{i}", "tgt": f"t{i}"} for i in range(200)]
    rows += [{"src": "s1 s1", "tgt": f"other {i}"} for i in range(5)]  # one source, several translations
    rows.append({"src": rows[0]["src"], "tgt": "another translation"})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = make_pairs(pairs_config(tmp_path, {"path": str(path)}, test_size=30, val_size=20, seed=3))
    read = {name: [json.loads(line) for line in (tmp_path / "pairs" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "val", "test")}
    assert {name: len(rows) for name, rows in read.items()} == report["splits"]
    assert len(read["test"]) == 30 and len(read["val"]) <= 20
    test_sources = {r["src"] for r in read["test"]}
    assert not test_sources & {r["src"] for r in read["train"] + read["val"]}
    total = sum(report["splits"].values()) + report["dropped"].get("source in test", 0)
    assert total == report["kept"] == len(rows)
    again = make_pairs(pairs_config(tmp_path, {"path": str(path)}, test_size=30, val_size=20, seed=3))
    assert again == report


@pytest.mark.parametrize("content, message", [
    (b'{"src": "ein Hund", "tgt": "a dog"}\n{"src": "eine Katze"}\n', "a.jsonl:2: no field 'tgt'"),
    (b'{"src": "ein Hund", "tgt": "a dog"}\n{"src": "x\xff", "tgt": "y"}\n', "a.jsonl:2: not UTF-8"),
    (b'{"src": "ein Hund", "tgt": "a dog"}\n\n{"src": "x", "tgt": 3}\n', "a.jsonl:3: field 'tgt' is int"),
])
def test_bad_pair_lines_name_the_file_and_line_and_write_nothing(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(content)
    with pytest.raises(SlmforgeError, match=message):
        make_pairs(pairs_config(tmp_path, {"path": str(path)}))
    assert not (tmp_path / "pairs").exists() or not any((tmp_path / "pairs").iterdir())
    skipped = make_pairs(pairs_config(tmp_path, {"path": str(path)}, on_bad_line="skip"))
    assert sum(skipped["bad_lines"].values()) == 1 and skipped["kept"] == 1


def test_bad_tsv_and_misaligned_files_are_named(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("ein Hund\ta dog\nno tab here\n", encoding="utf-8")
    with pytest.raises(SlmforgeError, match="a.tsv:2: expected source TAB target, got 1"):
        make_pairs(pairs_config(tmp_path, {"path": str(tsv)}))
    (tmp_path / "x.de").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "x.en").write_text("a\n", encoding="utf-8")
    with pytest.raises(SlmforgeError, match="x.de has 2 lines but .*x.en has 1"):
        make_pairs(pairs_config(tmp_path, {"path": str(tmp_path / "x.de"), "tgt_path": str(tmp_path / "x.en")}))


def test_finetune_names_the_file_and_line_of_a_bad_pair(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"src": "s1 s2", "tgt": "t1 t2"}] * 20 + [{"src": "s1", "tgt": " "}])
    with pytest.raises(SlmforgeError, match=r"bad.jsonl:21: field 'tgt' is empty"):
        finetune(translate_config(tmp_path, f'finetune.train_files=["{path}"]'))
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"src": "s1 s2", "tgt": "t1 t2"}, {"source": "s1", "tgt": "t1"}])
    with pytest.raises(SlmforgeError, match=r"bad2.jsonl:2: no field 'src'"):
        finetune(translate_config(tmp_path, f'finetune.train_files=["{path}"]'))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plone_catalogues_give_real_english_german_pairs(tmp_path):
    pytest.importorskip("polib")
    pytest.importorskip("plone.app.locales")
    from slmforge.cli import main

    out = tmp_path / "plone"
    assert main(["data", "pairs", "--input", "plone:de", "--swap", "--out", str(out), "pairs.test_size=100",
                 "pairs.val_size=50"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["read"] > 3000 and report["splits"]["test"] == 100 and report["dropped"]["empty"] > 0
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"src", "tgt"}
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert any(p["tgt"] == "Added files" and p["src"] == "Hinzugefügte Dateien" for p in pairs)
