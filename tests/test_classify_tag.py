"""Encoders fine-tuned for tasks: classify (a label per text or pair) and tag (a BIO tag per word).

Learning is proven on synthetic tasks with a known answer, where the untrained model is near chance:
classify -- "yes" iff a word of set A occurs in the text (anywhere: the [CLS] head must gather it);
tag -- person names (a first name, optionally followed by a surname) and places in Devanagari words of
several WordPiece pieces each, where a surname is I-PER only right after a first name and O elsewhere
(the tag depends on the context, and sits on each word's first piece).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPECIALS, crash_at_step, untimed, word_level_tokenizer
from safetensors.torch import load_file

from slmforge import config
from slmforge.checkpoint.writing import save_checkpoint
from slmforge.errors import SlmforgeError
from slmforge.finetune.classify import LabeledExample, LabelEncoder
from slmforge.finetune.config import FinetuneConfig
from slmforge.finetune.label_metrics import classification_report, entities, entity_report
from slmforge.finetune.run import finetune
from slmforge.models import EncoderConfig, build_model
from slmforge.objectives.base import IGNORE_INDEX

# ---------------------------------------------------------------- synthetic tasks

A = [f"a{i}" for i in range(4)]
FILL = [f"w{i}" for i in range(24)]


def classify_rows(count: int, seed: int, pairs: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        words = [str(w) for w in rng.choice(FILL, size=rng.integers(3, 9))]
        yes = bool(rng.random() < 0.5)
        if yes:
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(A)))
        row = {"text": " ".join(words), "label": "yes" if yes else "no"}
        if pairs:  # the answer sits in either half of the pair
            cut = len(words) // 2
            row = {"text": " ".join(words[:cut]) or "w0", "text_pair": " ".join(words[cut:]) or "w0",
                   "label": row["label"]}
        rows.append(row)
    return rows


# Devanagari syllables (consonant + matra), a few bare consonants and matra continuations: words of
# one to three pieces, some of which start with a matra (a "##ि" piece always follows its letter).
SYLLABLES = ["रा", "मि", "सु", "के", "दि", "लो", "को", "ना", "पु", "री", "भा", "गी", "जू", "टे", "शो"]
LETTERS = ["क", "ग", "त"]
MATRAS = ["ि", "ा", "ी"]


def devanagari_words(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < count:
        parts = list(rng.choice(SYLLABLES, size=rng.integers(1, 3)))
        if rng.random() < 0.4:
            parts.append(str(rng.choice(LETTERS)) + str(rng.choice(MATRAS)))
        word = "".join(parts)
        if word not in words and len(parts) > 1:
            words.append(word)
    return words


WORDS = devanagari_words(35, seed=0)
FIRST, LAST, CITY, FILLER = WORDS[:5], WORDS[5:10], WORDS[10:15], WORDS[15:]


def tag_rows(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(rng.integers(2, 5)):
            for _ in range(rng.integers(1, 3)):  # fillers, among them surnames that are no name here
                surname = rng.random() < 0.25 and not (tags and tags[-1] == "B-PER")
                tokens.append(str(rng.choice(LAST if surname else FILLER)))
                tags.append("O")
            draw = rng.random()
            if draw < 0.4:
                tokens.append(str(rng.choice(FIRST)))
                tags.append("B-PER")
                if rng.random() < 0.5:
                    tokens.append(str(rng.choice(LAST)))
                    tags.append("I-PER")
            elif draw < 0.75:
                tokens.append(str(rng.choice(CITY)))
                tags.append("B-LOC")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def piece_tokenizer(folder: Path):
    """A WordPiece tokenizer over SYLLABLES (word-initial and ## forms), bare letters and matras."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from slmforge.tokenizer import Tokenizer

    pieces = SYLLABLES + LETTERS
    vocab = {t: i for i, t in enumerate([*SPECIALS.values(), *pieces, *("##" + p for p in pieces + MATRAS)])}
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(list(SPECIALS.values()))
    tokenizer = Tokenizer(backend, roles=dict(SPECIALS), meta={"kind": "wordpiece"})
    tokenizer.save(folder)
    return tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def task_config(tmp_path: Path, task: str, *overrides: str, examples: int = 2000, name: str = "run",
                pairs: bool = False) -> FinetuneConfig:
    """From scratch: a tiny BERT (classify) or ModernBERT (tag: with RoPE, reading a word's pieces
    together is learned in a few hundred steps; learned absolute positions take thousands) and the
    task's tokenizer; held-out examples drawn with another seed."""
    tokenizer = tmp_path / f"tok-{task}"
    if not tokenizer.exists():
        if task == "classify":
            word_level_tokenizer(tokenizer, A + FILL)
        else:
            piece_tokenizer(tokenizer)
    rows = (lambda n, s: classify_rows(n, s, pairs)) if task == "classify" else tag_rows
    train = write_jsonl(tmp_path / f"{task}-train.jsonl", rows(examples, 1))
    test = write_jsonl(tmp_path / f"{task}-test.jsonl", rows(200, 2))
    return config.load(FinetuneConfig, overrides=[
        f"model.preset={'bert-tiny' if task == 'classify' else 'modernbert-tiny'}", "model.dropout=0.1",
        f"finetune.tokenizer={tokenizer}", f"finetune.task={task}", f'finetune.train_files=["{train}"]',
        f'finetune.val_files=["{test}"]', f"train.seq_len={32 if task == 'classify' else 80}",
        "train.batch_size=16", "train.max_steps=150", "train.log_every=50", "train.eval_every=0",
        "train.save_every=150", "optim.lr=3e-3", "schedule.warmup_steps=10", f"train.out_dir={tmp_path / name}",
        *overrides])


def held_out(run: Path) -> dict:
    from slmforge.checkpoint.reading import resolve_checkpoint

    return json.loads((resolve_checkpoint(run) / "eval.json").read_text())["finetune_held_out"]


# ---------------------------------------------------------------- metrics, by hand


def test_entities_are_read_from_bio_as_conlleval_reads_them():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert entities(["O", "I-PER", "I-PER", "B-PER"]) == [("PER", 1, 2), ("PER", 3, 3)]  # a stray I- starts one
    assert entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # another type: a new entity
    assert entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert entities(["B-LOC-CITY", "I-LOC-CITY"]) == [("LOC-CITY", 0, 1)]
    assert entities(["O", "O"]) == []


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-ORG", "B-PER"]]
    # gold: PER(0,1) LOC(3) | LOC(0) PER(2); predicted: PER(0,0) LOC(3) | LOC(0) ORG(1) PER(2)
    # right: LOC(3), LOC(0), PER(2) = 3 of 5 predicted, of 4 gold.
    report = entity_report(gold, pred)
    assert report["precision"] == pytest.approx(3 / 5) and report["recall"] == pytest.approx(3 / 4)
    assert report["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert report["per_type"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert report["per_type"]["PER"]["precision"] == pytest.approx(1 / 2)
    assert report["per_type"]["PER"]["recall"] == pytest.approx(1 / 2)
    assert report["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["word_accuracy"] == pytest.approx(5 / 7) and report["entities"] == 4
    assert entity_report([["O"]], [["O"]])["f1"] == 0.0  # nothing to find, nothing found


def test_classification_scores_by_hand():
    report = classification_report(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    assert report["accuracy"] == 0.5
    assert report["per_label"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["per_label"]["b"]["precision"] == pytest.approx(1 / 3) and report["per_label"]["b"]["f1"] == 0.5
    assert report["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


# ---------------------------------------------------------------- tokens and labels


def test_word_labels_sit_on_first_pieces_and_words_stay_whole(tmp_path):
    tokenizer = piece_tokenizer(tmp_path / "tok")
    words = [FIRST[0], LAST[0], "कि", CITY[1]]
    encoder = LabelEncoder(tokenizer, "tag", ["B-LOC", "B-PER", "I-PER", "O"], token_types=True)
    item = encoder.encode(LabeledExample("x", words=words, tags=["B-PER", "I-PER", "O", "B-LOC"]), 64)
    assert item.ids[0] == tokenizer.bos_id and item.ids[-1] == tokenizer.eos_id
    pieces = [tokenizer.encode(w) for w in words]
    assert all(len(p) >= 2 for p in pieces)  # every word is several pieces
    assert tokenizer.id_to_token(pieces[2][1]) == "##ि"  # a matra piece stays after its letter
    assert list(item.first) == [1 + sum(len(p) for p in pieces[:i]) for i in range(len(words))]
    assert list(item.ids[1:-1]) == [i for p in pieces for i in p]
    expected = [IGNORE_INDEX] * len(item.ids)
    for position, label in zip(item.first, [1, 2, 3, 0]):
        expected[position] = label
    assert list(item.labels) == expected
    # A pair: [CLS] text [SEP] pair [SEP], token types 0 then 1.
    encoder = LabelEncoder(tokenizer, "classify", ["no", "yes"], token_types=True)
    item = encoder.encode(LabeledExample("x", text=FIRST[0], pair=CITY[0], label="yes"), 64)
    a, b = tokenizer.encode(FIRST[0]), tokenizer.encode(CITY[0])
    assert list(item.ids) == [tokenizer.bos_id, *a, tokenizer.eos_id, *b, tokenizer.eos_id]
    assert list(item.types) == [0] * (len(a) + 2) + [1] * (len(b) + 1) and list(item.labels) == [1]


# ---------------------------------------------------------------- learning


def test_a_tiny_encoder_learns_to_classify(tmp_path, capsys):
    run = finetune(task_config(tmp_path, "classify"))
    report = held_out(run)
    assert report["accuracy"] >= 0.95 and report["macro_f1"] >= 0.95, report
    assert set(report["per_label"]) == {"no", "yes"}

    from slmforge.cli import main

    capsys.readouterr()
    test = tmp_path / "classify-test.jsonl"
    assert main(["eval", str(run), "--examples", f"test={test}", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["test"]
    assert row["accuracy"] == pytest.approx(report["accuracy"])
    assert row["loss"] == pytest.approx(report["loss"], rel=1e-4)
    plain = tmp_path / "texts.txt"
    plain.write_text("w1 w2 a3 w4\nw5 w6 w7\n\nw2 a0\n", encoding="utf-8")
    assert main(["classify", str(run), "--input", str(plain)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == ["yes", "no", "yes"]
    assert [(line["line"], line["text"]) for line in lines] == [(1, "w1 w2 a3 w4"), (2, "w5 w6 w7"), (4, "w2 a0")]
    assert all(0.5 < line["score"] <= 1 and line["score"] == max(line["scores"].values()) for line in lines)
    out = tmp_path / "predictions.jsonl"
    assert main(["classify", str(run), "--input", str(test), "--out", str(out)]) == 0
    predicted = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    gold = [json.loads(line)["label"] for line in test.read_text().splitlines()]
    assert np.mean([p == g for p, g in zip(predicted, gold)]) == pytest.approx(report["accuracy"])


def test_untrained_encoder_classifies_at_chance(tmp_path):
    """The control: the same evaluation of a model that has not learned (one step at lr 1e-9)."""
    report = held_out(finetune(task_config(tmp_path, "classify", "train.max_steps=1", "optim.lr=1e-9",
                                           "train.save_every=1")))
    assert report["accuracy"] <= 0.7, report


def test_text_pairs_are_learned(tmp_path):
    run = finetune(task_config(tmp_path, "classify", "train.max_steps=200", "train.save_every=200", pairs=True))
    assert held_out(run)["accuracy"] >= 0.95


def test_a_tiny_encoder_learns_to_tag_multi_piece_words(tmp_path, capsys):
    run = finetune(task_config(tmp_path, "tag", "train.max_steps=200", "train.save_every=200"))
    report = held_out(run)
    assert report["f1"] >= 0.95 and report["precision"] >= 0.95 and report["recall"] >= 0.95, report
    assert set(report["per_type"]) == {"PER", "LOC"}

    from slmforge.cli import main

    capsys.readouterr()
    sentence = [FILLER[0], FIRST[1], LAST[2], FILLER[3], LAST[1], CITY[4]]
    plain = tmp_path / "sentence.txt"
    plain.write_text(" ".join(sentence) + "\n", encoding="utf-8")
    assert main(["classify", str(run), "--input", str(plain)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["tokens"] == sentence
    assert line["tags"] == ["O", "B-PER", "I-PER", "O", "O", "B-LOC"]  # the second surname is no name here
    assert len(line["scores"]) == len(sentence)


def test_untrained_encoder_finds_no_entities(tmp_path):
    report = held_out(finetune(task_config(tmp_path, "tag", "train.max_steps=1", "optim.lr=1e-9",
                                           "train.save_every=1")))
    assert report["f1"] <= 0.4 and report["word_accuracy"] <= 0.5, report


# ---------------------------------------------------------------- resume, LoRA


def mlm_base(tmp_path: Path, task: str = "classify") -> Path:
    """A masked-LM encoder checkpoint with the task's tokenizer, as pretraining or import-hf leaves one."""
    task_config(tmp_path, task)  # writes the tokenizer
    from slmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / f"tok-{task}")
    model = build_model(EncoderConfig.from_name("bert-tiny", vocab_size=tokenizer.vocab_size, dropout=0.1), seed=5)
    run = tmp_path / "mlm"
    save_checkpoint(run, 0, model)
    tokenizer.save(run / "tokenizer")
    return run


@pytest.mark.parametrize("lora", [False, True])
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch, lora):
    if lora:
        pytest.importorskip("peft")
    base = mlm_base(tmp_path)
    common = [f"train.init_from={base}", "train.max_steps=20", "train.save_every=5", "finetune.eval_samples=0",
              "train.eval_every=10"] + (["lora.rank=4", "lora.dropout=0.1", "optim.lr=1e-2"] if lora else [])

    def cfg(name):
        c = task_config(tmp_path, "classify", *common, name=name, examples=400)
        c.model = None  # the model comes from train.init_from
        return c

    straight = finetune(cfg("straight"))
    with crash_at_step(monkeypatch, 13):
        finetune(cfg("resumed"))
    resumed = finetune(cfg("resumed"))
    final = "checkpoints/step-000020"
    names = ("model.safetensors", "adapter_model.safetensors") if lora else ("model.safetensors",)
    for name in names:
        a, b = load_file(straight / final / name), load_file(resumed / final / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert untimed(straight) == untimed(resumed)
    start = load_file(base / "checkpoints" / "step-000000" / "model.safetensors")
    end = load_file(straight / final / "model.safetensors")
    assert not any(k.startswith("head.") for k in end)
    assert {"classifier.dense.weight", "classifier.out.weight"} <= set(end)
    changed = {k for k in start if k in end and not torch.equal(start[k], end[k])}
    if lora:  # the encoder moved only where adapters sit (merged); the head trained whole
        assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                           "up_proj.weight", "down_proj.weight")) for k in changed)
        kept = load_file(straight / "base" / "model.safetensors")
        assert not torch.equal(kept["classifier.out.weight"], end["classifier.out.weight"])
    else:
        assert "embed.weight" in changed


# ---------------------------------------------------------------- export, import


def test_export_to_transformers_matches_and_labels_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slmforge.checkpoint.reading import load_model, open_run
    from slmforge.finetune.classify import label_run
    from slmforge.interop import export_hf, import_hf

    for task, auto in (("classify", transformers.AutoModelForSequenceClassification),
                       ("tag", transformers.AutoModelForTokenClassification)):
        run = finetune(task_config(tmp_path, task, "train.max_steps=30", "train.save_every=30", examples=300,
                                   name=f"run-{task}", pairs=task == "classify"))
        ours, _, meta = load_model(run)
        ours.eval()
        labels = ours.cfg.labels
        out = export_hf(run, tmp_path / f"hf-{task}")
        theirs, info = auto.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert theirs.config.id2label == dict(enumerate(labels))
        assert theirs.config.label2id == {label: i for i, label in enumerate(labels)}
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        if task == "classify":
            rows = classify_rows(6, seed=9, pairs=True)
            inputs = hf_tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows], padding=True,
                                  return_tensors="pt")
            # transformers' tokenizer gives the ids and token types slmforge trained on.
            spec = label_run(open_run(run))
            for b, r in enumerate(rows):
                item = spec.encoder.encode(LabeledExample("x", text=r["text"], pair=r["text_pair"]), 32)
                real = inputs["attention_mask"][b].bool()
                assert inputs["input_ids"][b][real].tolist() == item.ids.tolist()
                assert inputs["token_type_ids"][b][real].tolist() == item.types.tolist()
        else:
            sentences = [" ".join(r["tokens"]) for r in tag_rows(6, seed=9)]
            inputs = hf_tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = theirs.eval()(**inputs).logits
            actual = ours.classify(ours(inputs["input_ids"], inputs["attention_mask"],
                                        token_type_ids=inputs.get("token_type_ids")), inputs["attention_mask"])
        real = inputs["attention_mask"].bool() if task == "tag" else slice(None)
        assert (actual - expected)[real].abs().max().item() <= 1e-4
        # And back: the same labels, head and weights, bit for bit.
        import_hf(out, tmp_path / f"back-{task}")
        again, _, _ = load_model(tmp_path / f"back-{task}")
        assert again.cfg.head == task and again.cfg.labels == labels
        for name, tensor in ours.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), name

    # An imported classifier fine-tunes on: its labels and its head are kept.
    cfg = task_config(tmp_path, "tag", f"train.init_from={tmp_path / 'back-tag'}", "train.max_steps=3",
                      "train.save_every=3", examples=300, name="continued")
    cfg.model = None
    run = finetune(cfg)
    continued, _, _ = load_model(run)
    assert continued.cfg.labels == labels and continued.cfg.head == "tag"


def test_roberta_pairs_export_with_one_token_type(tmp_path):
    """XLM-R has a single token type: its exported tokenizer types a pair's second text 0, as slmforge
    feeds it, and the classifier's logits match transformers'."""
    transformers = pytest.importorskip("transformers")
    import dataclasses

    from test_hf_encoder import OUR_CASES, make_tokenizer_dir, randomize

    from slmforge.checkpoint.reading import open_run
    from slmforge.finetune.classify import label_run
    from slmforge.interop import export_hf

    cfg = dataclasses.replace(OUR_CASES["roberta"], head="classify", labels=["entail", "neutral", "contradict"])
    model = build_model(cfg)
    randomize(model)
    save_checkpoint(tmp_path / "run", 1, model)
    make_tokenizer_dir(tmp_path / "run" / "tokenizer", "roberta")
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts, pairs = ["the quick brown fox", "hello world"], ["jumps over the lazy dog", "a tiny tokenizer"]
    inputs = hf_tokenizer(texts, pairs, padding=True, return_tensors="pt")
    run = open_run(tmp_path / "run")
    spec = label_run(run)
    for b, (text, pair) in enumerate(zip(texts, pairs)):
        item = spec.encoder.encode(LabeledExample("x", text=text, pair=pair), 64)
        assert inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist() == item.ids.tolist()
    typed = hf_tokenizer(texts, pairs, padding=True, return_tensors="pt", return_token_type_ids=True)
    assert typed["token_type_ids"].max() == 0  # asked for, the types stay in the model's one row
    with torch.no_grad():
        expected = theirs(**inputs).logits
        actual = run.model.classify(run.model(inputs["input_ids"], inputs["attention_mask"]), inputs["attention_mask"])
    assert (actual - expected).abs().max().item() <= 1e-4
    assert theirs.config.id2label == {0: "entail", 1: "neutral", 2: "contradict"}


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert"])
@pytest.mark.parametrize("task", ["classify", "tag"])
def test_export_of_every_family_and_head_matches_transformers(tmp_path, family, task):
    """Random weights large enough to move every logit; padded batches; and back to the same weights."""
    transformers = pytest.importorskip("transformers")
    import dataclasses

    from test_hf_encoder import OUR_CASES, batch, make_tokenizer_dir, randomize

    from slmforge.checkpoint.reading import load_model
    from slmforge.interop import export_hf, import_hf

    cfg = dataclasses.replace(OUR_CASES[family], head=task, labels=["B-X", "I-X", "O"])
    model = build_model(cfg).eval()
    randomize(model)
    save_checkpoint(tmp_path / "run", 1, model)
    make_tokenizer_dir(tmp_path / "run" / "tokenizer", family)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    auto = (transformers.AutoModelForSequenceClassification if task == "classify"
            else transformers.AutoModelForTokenClassification)
    theirs, info = auto.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    inputs = batch(family)
    with torch.no_grad():
        expected = theirs.eval()(**inputs).logits
        actual = model.classify(model(inputs["input_ids"], inputs["attention_mask"]), inputs["attention_mask"])
    real = inputs["attention_mask"].bool() if task == "tag" else slice(None)
    assert (actual - expected)[real].abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.5  # not a trivially small comparison
    import_hf(out, tmp_path / "back")
    again, _, _ = load_model(tmp_path / "back")
    assert again.cfg == dataclasses.replace(cfg, preset=None)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


HF_CASES = ["bert-classify", "bert-tag", "xlm-roberta-classify", "roberta-tag", "modernbert-classify",
            "modernbert-tag"]


@pytest.mark.parametrize("case", HF_CASES)
def test_import_of_transformers_classifiers_matches(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    from test_hf_encoder import HF_FAMILY, batch, hf_model, make_tokenizer_dir, randomize

    from slmforge.checkpoint.reading import load_model
    from slmforge.interop import import_hf

    arch, _, task = case.rpartition("-")
    masked = hf_model(arch)
    config_ = masked.config
    config_.id2label, config_.label2id = {0: "neg", 1: "neu", 2: "pos"}, {"neg": 0, "neu": 1, "pos": 2}
    cls = getattr(transformers, type(masked).__name__.replace(
        "ForMaskedLM", "ForSequenceClassification" if task == "classify" else "ForTokenClassification"))
    torch.manual_seed(0)
    theirs = cls(config_).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    family = HF_FAMILY[arch]
    make_tokenizer_dir(tmp_path / "hf", family)
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _, meta = load_model(tmp_path / "run")
    ours.eval()
    assert ours.cfg.head == task and ours.cfg.labels == ["neg", "neu", "pos"]
    inputs = batch(family)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        actual = ours.classify(ours(inputs["input_ids"], inputs["attention_mask"]), inputs["attention_mask"])
    real = inputs["attention_mask"].bool() if task == "tag" else slice(None)
    assert (actual - expected)[real].abs().max().item() <= 1e-4


# ---------------------------------------------------------------- refusals


def test_bad_lines_and_wrong_models_are_refused_in_one_line(tmp_path):
    cfg = task_config(tmp_path, "tag", "train.max_steps=2")
    write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["x", "y"], "tags": ["O", "PER"]}])
    cfg.finetune.val_files = [str(tmp_path / "bad.jsonl")]
    with pytest.raises(SlmforgeError, match=r"bad.jsonl:1: tag 'PER' is not BIO"):
        finetune(cfg)
    cfg = task_config(tmp_path, "classify", "train.max_steps=2", name="unknown")
    write_jsonl(tmp_path / "unknown.jsonl", [{"text": "w1 w2", "label": "maybe"}])
    cfg.finetune.val_files = [str(tmp_path / "unknown.jsonl")]
    with pytest.raises(SlmforgeError, match=r"unknown.jsonl:1: label 'maybe' is not one of the run's labels"):
        finetune(cfg)
    cfg = task_config(tmp_path, "classify", "train.max_steps=2", "model.preset=test-tiny", name="decoder")
    with pytest.raises(SlmforgeError, match="trains encoders"):
        finetune(cfg)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "w1", "label": "yes"}] * 20)
    cfg = task_config(tmp_path, "classify", "train.max_steps=2", name="one")
    cfg.finetune.train_files = [str(one)]
    with pytest.raises(SlmforgeError, match="at least two labels"):
        finetune(cfg)


def test_generate_on_a_classifier_points_to_classify(tmp_path, capsys):
    from slmforge.cli import main

    run = finetune(task_config(tmp_path, "classify", "train.max_steps=2", examples=40))
    assert main(["generate", str(run), "-p", "w1 w2"]) == 2
    err = capsys.readouterr().err
    assert "fine-tuned to classify labels rather than continuing text; use `slmforge classify" in err, err
