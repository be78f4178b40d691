"""`data prepare` end to end: documents survive the round trip, the output does not depend on the
number of workers, an interrupted run (exception or SIGKILL) resumes to the same bytes, and a folder
made with other settings is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from slmforge import config
from slmforge.data import prepare, shards
from slmforge.data.encode import DocumentEncoder, EncoderPool
from slmforge.text.mixture import Interleaver
from slmforge.data.prepare import DataConfig, load_config, prepare_data
from slmforge.data.progress import Progress
from slmforge.data.resume import PROGRESS
from slmforge.data.shards import ShardSet
from slmforge.text.sources import SourceReader
from slmforge.errors import ConfigError, SlmforgeError

WORDS = {
    "as": ["অসম", "ভাষা", "মানুহ", "গছ", "নদী", "কিতাপ", "ঘৰ"],
    "hi": ["भारत", "भाषा", "लोग", "पेड़", "नदी", "किताब", "घर"],
    "en": ["river", "tree", "people", "language", "the", "book", "house"],
}
BAD = {"empty": 3, "invalid_utf8": 2}  # injected into the Assamese file


def write_corpus(root: Path, docs_per_lang: int = 400, seed: int = 0) -> dict[str, list[str]]:
    """One file per language; every document starts with `lang-i` so it is unique and traceable."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for lang, words in WORDS.items():
        docs[lang] = [f"{lang}-{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
                      for i in range(docs_per_lang)]
        body = "\n".join(docs[lang]).encode() + b"\n"
        if lang == "as":
            body = b"\n\n   \n" + body + b"bad \xff line\n\xc3\n"
        (root / f"{lang}.txt").write_bytes(body)
    return docs


def make_tokenizer(folder: Path, texts: list[str], extra_tokens: int = 0) -> Path:
    """A byte-level BPE (exact round trip) in the HF folder layout, eos named in tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = "<eos>"
    if extra_tokens:  # push the vocabulary (and the eos id) past uint16
        tok.add_tokens([f"<x{i}>" for i in range(extra_tokens)])
        tok.add_special_tokens(["<end>"])
        eos = "<end>"
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": eos}))
    return folder


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Many small batches (and byte ranges), so a small corpus still gives many checkpoints to crash between."""
    monkeypatch.setattr(prepare, "BATCH_DOCUMENTS", 64)
    monkeypatch.setattr(prepare, "RANGE_BYTES", 4096)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    docs = write_corpus(root / "corpus")
    tokenizer = make_tokenizer(root / "tok", [d for v in docs.values() for d in v])
    return root, docs, tokenizer


def config_for(setup, out: Path, **fields) -> DataConfig:
    root, _, tokenizer = setup
    data = {
        "sources": [{"path": str(root / "corpus" / f"{lang}.txt"), "lang": lang, "weight": w}
                    for lang, w in (("as", 0.5), ("hi", 0.3), ("en", 0.2))],
        "tokenizer": str(tokenizer), "out": str(out), "shard_tokens": 2000, "workers": 1,
        "val_fraction": 0.1, "seed": 3,
    }
    data.update(fields)
    return load_config(overrides=[], flags=data)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def split_documents(folder: Path, split: str, tokenizer: Path) -> list[str]:
    """Decode a split back into documents, checking the `[bos] tokens eos` layout."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    manifest = json.loads((folder / "manifest.json").read_text())
    data = ShardSet(folder, split)
    ids = data.read(0, data.num_tokens)
    ends = np.flatnonzero(ids == manifest["eos_id"])
    assert len(ends) == manifest["splits"][split]["documents"]
    docs, start = [], 0
    for end in ends:
        doc = ids[start:end].tolist()
        if manifest["bos_id"] is not None:
            assert doc[0] == manifest["bos_id"]
            doc = doc[1:]
        docs.append(tok.decode(doc, skip_special_tokens=False))
        start = end + 1
    assert start == len(ids)
    return docs


def test_round_trip_mixture_order_and_manifest(setup, tmp_path):
    root, docs, tokenizer = setup
    cfg = config_for(setup, tmp_path / "out")
    out = prepare_data(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    train = split_documents(out, "train", tokenizer)
    val = split_documents(out, "val", tokenizer)

    # Every document lands in exactly one split, in the mixture's order.
    everything = [d for v in docs.values() for d in v]
    assert Counter(train + val) == Counter(everything)
    order = [text for _, text in Interleaver([SourceReader(s) for s in cfg.sources],
                                             [0.5, 0.3, 0.2], cfg.seed)]
    held_out = set(val)
    assert train == [d for d in order if d not in held_out]
    assert val == [d for d in order if d in held_out]
    n = len(everything)
    assert abs(len(val) - 0.1 * n) <= 5 * (n * 0.1 * 0.9) ** 0.5

    # The manifest accounts for every token, byte, document and skipped line.
    assert manifest["format"] == shards.FORMAT and manifest["dtype"] == "uint16"
    assert manifest["document_layout"] == "[bos] tokens eos"
    for split, texts in (("train", train), ("val", val)):
        info = manifest["splits"][split]
        assert info["documents"] == len(texts)
        assert info["bytes"] == sum(len(t.encode()) for t in texts)
        assert info["tokens"] == ShardSet(out, split).num_tokens
        assert len(info["shards"]) >= (2 if split == "train" else 1)
    drawn = [s["drawn"] for s in manifest["sources"]]
    assert [d["documents"] for d in drawn] == [len(docs[k]) for k in ("as", "hi", "en")]
    assert sum(d["tokens"] for d in drawn) == sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    assert manifest["skipped"] == BAD
    as_file = manifest["sources"][0]["files"][0]
    assert as_file["skipped"] == {"empty": {"count": 3, "first_line": 1},
                                  "invalid_utf8": {"count": 2, "first_line": 404}}
    assert manifest["tokenizer"]["sha256"] and "workers" not in manifest["config"]
    assert not (out / PROGRESS).exists()


def test_uint32_shards_for_a_large_vocabulary(setup, tmp_path):
    _, docs, _ = setup
    texts = docs["en"][:50]
    (tmp_path / "en.txt").write_text("\n".join(texts) + "\n")
    tokenizer = make_tokenizer(tmp_path / "bigtok", texts, extra_tokens=66_000)
    cfg = load_config(flags={"sources": [{"path": str(tmp_path / "en.txt")}], "tokenizer": str(tokenizer),
                             "out": str(tmp_path / "out"), "val_fraction": 0.0, "workers": 1})
    out = prepare_data(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] > 2**16
    assert manifest["eos_id"] >= 2**16
    assert split_documents(out, "train", tokenizer) == texts
    assert manifest["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0, "bytes": 0}


def test_output_does_not_depend_on_worker_count_or_batch_size(setup, tmp_path, monkeypatch):
    one = prepare_data(config_for(setup, tmp_path / "w1", workers=1), show_progress=False)
    monkeypatch.setattr(prepare, "BATCH_DOCUMENTS", 100)
    two = prepare_data(config_for(setup, tmp_path / "w2", workers=2), show_progress=False)
    assert folder_bytes(one) == folder_bytes(two)


def test_val_documents_and_no_bos(setup, tmp_path):
    root, _, tokenizer = setup
    cfg = config_for(setup, tmp_path / "out", val_documents=25, add_bos=False)
    out = prepare_data(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bos_id"] is None and manifest["document_layout"] == "tokens eos"
    order = [t for _, t in Interleaver([SourceReader(s) for s in cfg.sources], [0.5, 0.3, 0.2], cfg.seed)]
    assert split_documents(out, "val", tokenizer) == order[:25]
    assert split_documents(out, "train", tokenizer) == order[25:]


def test_temperature_sampling_records_sizes(setup, tmp_path):
    root, docs, _ = setup
    cfg = config_for(setup, tmp_path / "out", sampling="temperature", alpha=0.5,
                     sources=[{"path": str(root / "corpus" / "as.txt")},
                              {"path": str(root / "corpus" / "en.txt"), "lang": "en"}])
    manifest = json.loads((prepare_data(cfg, show_progress=False) / "manifest.json").read_text())
    assert [s["size_documents"] for s in manifest["sources"]] == [400, 400]
    assert [s["probability"] for s in manifest["sources"]] == [0.5, 0.5]


class Crash(Exception):
    pass


def crash_after(monkeypatch, calls: int, error: type[BaseException] = Crash) -> None:
    """Make the shard writers fail on their `calls`-th append, as a crash or Ctrl-C mid-run would."""
    original = shards.ShardWriter.add_many
    count = {"n": 0}

    def add_many(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise error()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(shards.ShardWriter, "add_many", add_many)


@pytest.mark.parametrize("calls,error,crash_workers,resume_workers", [
    (2, Crash, 1, 1), (9, Crash, 1, 1), (17, Crash, 1, 2), (13, KeyboardInterrupt, 2, 1)])
def test_resume_after_a_crash_gives_identical_bytes(setup, tmp_path, monkeypatch, calls, error,
                                                    crash_workers, resume_workers):
    reference = prepare_data(config_for(setup, tmp_path / "ref", shard_tokens=1500), show_progress=False)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_after(patch, calls, error)
        with pytest.raises(error):
            prepare_data(config_for(setup, out, shard_tokens=1500, workers=crash_workers),
                         show_progress=False)
    if calls == 2:  # inside the first batch: nothing was checkpointed, and nothing is left behind
        assert not (out / PROGRESS).exists() and not out.exists()
        done = []
    else:
        done = json.loads((out / PROGRESS).read_text())["writers"]["train"]["shards"]
    stamps = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in done}
    prepare_data(config_for(setup, out, shard_tokens=1500, workers=resume_workers), show_progress=False)
    assert folder_bytes(out) == folder_bytes(reference)
    # Finished shards were not rewritten.
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    if calls > 2:
        assert done, "the crash should come after at least one finished shard"


def test_resume_after_sigkill_gives_identical_bytes(setup, tmp_path):
    reference = prepare_data(config_for(setup, tmp_path / "ref", shard_tokens=1500), show_progress=False)
    out = tmp_path / "out"
    cfg_path = tmp_path / "data.toml"
    cfg = config_for(setup, out, shard_tokens=1500, workers=2)
    cfg_path.write_text(tomli_w.dumps({"data": config.to_dict(cfg)}))
    script = textwrap.dedent(f"""
        import os, signal
        from slmforge.data import prepare, shards
        from slmforge.data.prepare import load_config, prepare_data
        prepare.BATCH_DOCUMENTS = 64
        original = shards.ShardWriter.add_many
        calls = [0]
        def add_many(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 12:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally, no flush
            return original(self, *args, **kwargs)
        shards.ShardWriter.add_many = add_many
        prepare_data(load_config({str(cfg_path)!r}), show_progress=False)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert (out / PROGRESS).exists() and not (out / "manifest.json").exists()
    prepare_data(load_config(cfg_path), show_progress=False)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_killed_worker_stops_the_run_in_one_line_and_it_resumes(setup, tmp_path):
    """A worker process killed mid-run (the OOM killer) ends `data prepare` with one clear error instead
    of a hang, and the same command then finishes with the bytes of an uninterrupted run."""
    reference = prepare_data(config_for(setup, tmp_path / "ref", shard_tokens=1500), show_progress=False)
    out = tmp_path / "out"
    cfg_path = tmp_path / "data.toml"
    cfg_path.write_text(tomli_w.dumps({"data": config.to_dict(config_for(setup, out, shard_tokens=1500, workers=2))}))
    script = textwrap.dedent(f"""
        import os, signal, sys
        from slmforge.cli import main
        from slmforge.data import encode, prepare
        prepare.BATCH_DOCUMENTS = 64
        original = encode._worker_encode
        calls = [0]
        def dying(texts):
            calls[0] += 1
            if calls[0] == 4 and os.getpid() != {os.getpid()}:
                os.kill(os.getpid(), signal.SIGKILL)  # a worker killed from outside
            return original(texts)
        encode._worker_encode = dying
        sys.exit(main(["data", "prepare", "-c", {str(cfg_path)!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "an encoding worker process died" in result.stderr and "Traceback" not in result.stderr
    prepare_data(load_config(cfg_path), show_progress=False)
    assert folder_bytes(out) == folder_bytes(reference)


def test_refuses_a_folder_made_with_other_settings(setup, tmp_path, monkeypatch):
    root, docs, _ = setup
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_after(patch, 5)
        with pytest.raises(Crash):
            prepare_data(config_for(setup, out), show_progress=False)
    with pytest.raises(SlmforgeError, match="interrupted run with different seed; rerun"):
        prepare_data(config_for(setup, out, seed=4), show_progress=False)
    other_tok = make_tokenizer(tmp_path / "tok2", docs["en"])
    with pytest.raises(SlmforgeError, match="interrupted run with different tokenizer"):
        prepare_data(config_for(setup, out, tokenizer=str(other_tok)), show_progress=False)
    # Different workers is the same run: it resumes and finishes.
    prepare_data(config_for(setup, out, workers=2), show_progress=False)
    with pytest.raises(SlmforgeError, match="already holds data prepared with different shard_tokens"):
        prepare_data(config_for(setup, out, shard_tokens=999), show_progress=False)
    before = folder_bytes(out)
    prepare_data(config_for(setup, out), show_progress=False)  # done already: nothing to do
    assert folder_bytes(out) == before


def test_refuses_foreign_folder_and_changed_inputs(setup, tmp_path, monkeypatch):
    root, docs, tokenizer = setup
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SlmforgeError, match="not an empty folder or a slmforge data folder"):
        prepare_data(config_for(setup, foreign), show_progress=False)

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs["en"]) + "\n")
    cfg = load_config(flags={"sources": [{"path": str(corpus)}], "tokenizer": str(tokenizer),
                             "out": str(tmp_path / "out"), "shard_tokens": 500, "workers": 1})
    with monkeypatch.context() as patch:
        crash_after(patch, 3)
        with pytest.raises(Crash):
            prepare_data(cfg, show_progress=False)
    with open(corpus, "a") as f:
        f.write("one more line\n")
    with pytest.raises(SlmforgeError, match=r"c\.txt: changed since the interrupted run"):
        prepare_data(cfg, show_progress=False)


def test_empty_corpus_is_one_line_error(setup, tmp_path):
    _, _, tokenizer = setup
    (tmp_path / "e.txt").write_bytes(b"\n\xff\n")
    cfg = load_config(flags={"sources": [{"path": str(tmp_path / "e.txt")}], "tokenizer": str(tokenizer),
                             "out": str(tmp_path / "out"), "workers": 1})
    with pytest.raises(SlmforgeError,
                       match=r"e\.txt: no documents in 1 file\(s\) \(skipped: 1 empty, 1 invalid_utf8\)"):
        prepare_data(cfg, show_progress=False)


def test_config_from_toml_section_flags_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent("""
        [model]
        preset = "tiny"

        [data]
        sources = [{path = "as.txt", lang = "as", weight = 0.5}, {path = "hi.txt", lang = "hi", weight = 0.5}]
        tokenizer = "tok"
        seed = 1
    """))
    cfg = load_config(path, ["data.seed=9", "data.val_documents=10"], {"out": "elsewhere"})
    assert [s.lang for s in cfg.sources] == ["as", "hi"] and cfg.sources[0].weight == 0.5
    assert (cfg.seed, cfg.val_documents, cfg.out, cfg.tokenizer) == (9, 10, "elsewhere", "tok")
    # an override's error names the field, not the file (the file is not at fault); a file's error names it
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: must be in \[0, 1\)"):
        load_config(path, ["data.val_fraction=1.5"])
    path.write_text(path.read_text().replace("seed = 1", "seed = -1"))
    with pytest.raises(ConfigError, match=r"run\.toml: data\.seed: must be >= 0"):
        load_config(path, ["data.val_documents=10"])
    path.write_text(path.read_text().replace("seed = -1", "seed = 1"))
    with pytest.raises(ConfigError, match=r"override 'train.steps=3': only data\.\* fields apply here"):
        load_config(path, ["train.steps=3"])
    with pytest.raises(ConfigError, match="data.tokenizer: required"):
        load_config(None, [], {"sources": [{"path": "x"}]})


def test_cli_verb_runs_prepare(setup, tmp_path, capsys):
    import argparse

    from slmforge.data import commands

    root, _, tokenizer = setup
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["data", "prepare", "data.workers=1", "data.shard_tokens=5000",
                              "--input", str(root / "corpus" / "as.txt"), str(root / "corpus" / "hi.txt"),
                              "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["lang"] for s in manifest["sources"]] == ["und", "und"]
    assert manifest["config"]["shard_tokens"] == 5000
    err = capsys.readouterr().err
    assert "prepare:" in err and "train documents" in err
    args = parser.parse_args(["data", "prepare", "--show-fields"])
    assert args.func(args) == 0
    assert "data.sources[].text_unit" in capsys.readouterr().out


def test_a_run_that_wrote_nothing_is_replaced(setup, tmp_path):
    _, _, tokenizer = setup
    (tmp_path / "e.txt").write_text("\n")
    out = tmp_path / "out"
    good = setup[0] / "corpus" / "en.txt"
    bad = config_for(setup, out, sources=[{"path": str(good), "weight": 1}, {"path": str(tmp_path / "e.txt"),
                                                                         "weight": 1}])
    with pytest.raises(SlmforgeError, match="e.txt: no documents"):
        prepare_data(bad, show_progress=False)
    assert not out.exists()  # a run that wrote no document leaves nothing behind to resume or refuse
    prepare_data(config_for(setup, out), show_progress=False)  # a fixed config starts over
    assert (out / "manifest.json").exists()


def test_the_same_command_works_once_the_input_is_fixed(setup, tmp_path):
    """An empty corpus fails; the user adds text and reruns the same command: it must not be refused
    as "changed since the interrupted run" (a run that produced nothing has nothing to resume)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n")
    out = tmp_path / "out"
    out.mkdir()  # made by the user beforehand: left in place, empty
    cfg = config_for(setup, out, sources=[{"path": str(corpus)}])
    with pytest.raises(SlmforgeError, match="c.txt: no documents"):
        prepare_data(cfg, show_progress=False)
    assert out.is_dir() and not any(out.iterdir())
    corpus.write_text("\n".join(setup[1]["en"]) + "\n", encoding="utf-8")
    prepare_data(cfg, show_progress=False)
    assert (out / "manifest.json").exists()

def test_an_interrupted_run_that_wrote_nothing_does_not_block_a_changed_input(setup, tmp_path, monkeypatch):
    """Ctrl-C (or kill -9) before the first document leaves a progress file with nothing in it; a rerun
    after the input was edited must start afresh, not refuse the edit."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(setup[1]["en"][:100]) + "\n", encoding="utf-8")
    cfg = config_for(setup, tmp_path / "out", sources=[{"path": str(corpus)}])
    with monkeypatch.context() as patch:
        crash_after(patch, 1, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare_data(cfg, show_progress=False)
    assert json.loads((tmp_path / "out" / PROGRESS).read_text())["documents"] == 0
    corpus.write_text("\n".join(setup[1]["en"]) + "\n", encoding="utf-8")
    prepare_data(cfg, show_progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["documents"] > 100


def test_tokenizing_keeps_few_batches_in_flight(setup):
    _, _, tokenizer = setup
    encoder = DocumentEncoder(str(tokenizer), 1, 2, "uint16", 0.0, 0)
    pulled = []

    def jobs():
        for i in range(40):
            pulled.append(i)
            yield i, [f"document {i}"]

    with EncoderPool(encoder, 2) as pool:
        for done, (tag, batch) in enumerate(pool.map(jobs())):
            assert tag == done  # in order
            assert len(pulled) - done <= 2 * 2  # bounded read-ahead, whatever the corpus size
            assert batch.tokens[0] == 1 and batch.tokens[-1] == 2


def test_progress_line_has_rate_and_eta():
    import io

    stream = io.StringIO()
    log = Progress("prepare", total_bytes=1000, stream=stream)
    log.update(0, 0, 0, consumed=0)
    log.update(10, 500, 2_000_000, consumed=250, new_text_bytes=2_000_000, force=True)
    line = stream.getvalue().strip()
    assert line.startswith("prepare: 10 docs, 500 tokens, 2.0 MB,") and "MB/s" in line
    assert "25%, ETA" in line


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    from slmforge.cli import main

    _, _, tokenizer = setup
    code = main(["data", "prepare", "--input", str(tmp_path / "missing.txt"), "--tokenizer", str(tokenizer),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"slmforge: error: {tmp_path / 'missing.txt'}: no such file or folder\n"


def test_special_token_strings_in_text_stay_text(tmp_path):
    """A corpus line that spells out `<eos>` is text, not an end-of-document marker."""
    from slmforge.data.shards import ShardSet
    from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("the <eos> token ends a document\n" * 50 + "plain words here\n" * 50, encoding="utf-8")
    tok_dir = train_tokenizer(TokenizerConfig(vocab_size=300, inputs=[str(corpus)]), tmp_path / "tok")
    out = prepare_data(load_config(flags={"sources": [{"path": str(corpus)}], "tokenizer": str(tok_dir),
                                          "out": str(tmp_path / "data"), "val_fraction": 0.0,
                                          "workers": 1}), show_progress=False)
    tok = load_tokenizer(tok_dir)
    tokens = ShardSet(out, "train").read(0, ShardSet(out, "train").num_tokens)
    assert (tokens == tok.eos_id).sum() == 100  # one per document, none from the literal "<eos>"


def test_a_mostly_binary_file_fails_naming_it(setup, tmp_path):
    root = setup[0]
    blob = tmp_path / "photo.txt"
    rng = random.Random(1)
    blob.write_bytes(bytes(rng.randrange(256) for _ in range(200_000)))
    sources = [{"path": str(root / "corpus" / "en.txt")}, {"path": str(blob)}]
    with pytest.raises(SlmforgeError, match=r"photo\.txt: [\d,]+ of [\d,]+ lines are not UTF-8 \(first at line "
                                            r"\d+\): a binary file or another encoding\?"):
        prepare_data(config_for(setup, tmp_path / "out", sources=sources), show_progress=False)
    # the threshold is configurable; below it, bad lines are skipped and counted as before
    out = prepare_data(config_for(setup, tmp_path / "tolerant", sources=sources, max_invalid_utf8=1.0),
                       show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["invalid_utf8"] > 500
    assert "max_invalid_utf8" not in manifest["config"]  # it does not shape the bytes
    # a few bad lines in a good file (the Assamese one has 2 of 405) stay a count, not an error
    prepare_data(config_for(setup, tmp_path / "few"), show_progress=False)


def test_a_huge_line_is_one_document_tokenized_in_bounded_pieces(setup, tmp_path, monkeypatch):
    from slmforge.data import encode
    from slmforge.tokenizer import load_tokenizer
    from slmforge.tokenizer.tokenizer import Tokenizer

    root, docs, tokenizer = setup
    line = " ".join(docs["hi"] + docs["as"]) * 4  # one line of ~200k characters, no newline inside
    path = tmp_path / "one-line.txt"
    path.write_text(line + "\nshort document\n", encoding="utf-8")
    seen: list[int] = []
    original = Tokenizer.encode_batch

    def encode_batch(self, texts, *args, **kwargs):
        seen.append(sum(len(t) for t in texts))
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode_batch", encode_batch)
    monkeypatch.setattr(encode, "PIECE_GROUP_CHARS", 30_000)
    out = prepare_data(config_for(setup, tmp_path / "out", sources=[{"path": str(path)}], piece_chars=5_000,
                                  val_fraction=0.0), show_progress=False)
    assert max(seen) <= 30_000 and len(seen) > len(line) // 30_000  # never the whole line at once
    train = ShardSet(out, "train")
    assert train.manifest["splits"]["train"]["documents"] == 2
    assert train.num_bytes == len(line.encode()) + len("short document")
    ids = train.read(0, train.num_tokens).tolist()
    eos = load_tokenizer(tokenizer).eos_id
    first = ids[:ids.index(eos)]
    assert load_tokenizer(tokenizer).decode(first) == line  # every character, in order, in one document


def test_manifest_bytes_count_the_normalized_text(tmp_path):
    import unicodedata

    from slmforge.data.encode import encoded_text_bytes
    from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    composed = ["Grüße aus Köln", "café naïve résumé", "फ़िल्म ज़रूर देखें", "Straße und Fluß"]
    decomposed = [unicodedata.normalize("NFD", t) for t in composed]  # what some editors and macOS write
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(decomposed * 20) + "\n", encoding="utf-8")
    tok = train_tokenizer(TokenizerConfig(vocab_size=320, inputs=[str(corpus)]), tmp_path / "tok")
    out = prepare_data(load_config(flags={"sources": [{"path": str(corpus)}], "tokenizer": str(tok),
                                          "out": str(tmp_path / "data"), "workers": 1}), show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    counted = sum(manifest["splits"][s]["bytes"] for s in ("train", "val"))
    nfc = 20 * sum(len(unicodedata.normalize("NFC", t).encode()) for t in decomposed)
    assert counted == nfc != 20 * sum(len(t.encode()) for t in decomposed)
    assert "NFC" in manifest["bytes_counted"]
    # eval counts the same way, so bits per byte of training and of eval --text agree on the text
    assert encoded_text_bytes(load_tokenizer(tok), decomposed) == nfc // 20


def test_wrapped_prose_is_read_by_paragraph_and_said(setup, tmp_path, capsys):
    import textwrap as tw

    root, docs, _ = setup
    paragraphs = [" ".join(docs["en"][i:i + 6]) for i in range(0, 120, 6)]  # 20 paragraphs of prose
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(tw.fill(p, 70) for p in paragraphs) + "\n", encoding="utf-8")
    out = prepare_data(config_for(setup, tmp_path / "out", sources=[{"path": str(book)}], val_fraction=0.0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 20  # not one document per wrapped line
    assert manifest["sources"][0]["files"][0]["text_unit"] == "paragraph"
    err = capsys.readouterr().err
    assert f"{book}: wrapped prose (" in err and "one document per paragraph" in err
    # one sentence per line (the quickstart's corpora) stays one document per line
    out = prepare_data(config_for(setup, tmp_path / "lines", sources=[{"path": str(root / "corpus" / "en.txt")}],
                                  val_fraction=0.0), show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 400
    assert manifest["sources"][0]["files"][0]["text_unit"] == "line"


# -- one source: the workers read byte ranges of its files themselves

def awkward_lines(docs: dict[str, list[str]], seed: int = 5) -> list[bytes]:
    """Every document of the three languages, shuffled, with what a range cut must not break: "\\r\\n"
    endings, multi-byte characters, empty, blank and non-UTF-8 lines (one a cut multi-byte character)."""
    lines = [d.encode() for lang in ("as", "hi", "en") for d in docs[lang]]
    random.Random(seed).shuffle(lines)
    out = []
    for i, line in enumerate(lines):
        out.append(line + (b"\r\n" if i % 3 == 0 else b"\n"))
        if i % 97 == 5:
            out.append(b"\n")
        if i % 151 == 7:
            out.append(b"bad \xff line\n" if i % 2 else "নদী".encode()[:-1] + b"\n")
        if i % 173 == 11:
            out.append(b"  \t\r\n")
    return out


def write_one_source(root: Path, docs: dict[str, list[str]], kind: str) -> dict:
    """A single source of uncompressed files of `kind`, as a [data] sources entry."""
    root.mkdir()
    lines = awkward_lines(docs)
    if kind == "lines":  # one big file, starting with a UTF-8 byte order mark
        (root / "all.txt").write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
        return {"path": str(root / "all.txt")}
    if kind == "jsonl":
        records = [json.dumps({"text": line.rstrip(b"\r\n").decode("utf-8", "replace")}).encode() + b"\n"
                   for line in lines]
        records[10:10] = [b"{broken\n", b'{"other": 1}\r\n', b'{"text": "\xff"}\n', b"\n"]
        (root / "all.jsonl").write_bytes(b"".join(records))
        return {"path": str(root / "all.jsonl")}
    if kind == "paragraphs":  # wrapped prose (text_unit "auto" reads it by paragraph), some words not UTF-8
        words = [w for line in lines for w in line.rstrip(b"\r\n").split(b" ") if w.strip()]
        text = b""
        for i in range(0, len(words), 40):
            ending = b"\r\n" if i % 160 == 0 else b"\n"
            rows = [b" ".join(words[j:j + 8]) for j in range(i, min(i + 40, len(words)), 8)]
            text += ending.join(rows) + ending + (b"\n" if i % 200 else b" \n\n")
        (root / "book.txt").write_bytes(text)
        return {"path": str(root / "book.txt")}
    # a folder: files big and small (several in one job), an empty one, JSONL beside text
    (root / "a.txt").write_bytes(b"".join(lines[:700]))
    (root / "b.txt").write_bytes(b"".join(lines[700:703]))
    (root / "c.txt").write_bytes(b"")
    (root / "d.txt").write_bytes(b"".join(lines[703:710]))
    (root / "e.jsonl").write_bytes(b"".join(json.dumps({"text": line.decode("utf-8", "replace")}).encode() + b"\n"
                                            for line in lines[710:]))
    return {"path": str(root)}


@pytest.mark.parametrize("kind", ["lines", "jsonl", "paragraphs", "folder"])
def test_one_source_read_in_ranges_gives_the_shards_of_one_reader(setup, tmp_path, monkeypatch, kind):
    """The workers read ranges of the files themselves; the shards and the manifest (documents, skipped
    lines and the line each was first seen on, text units) equal those of reading it all in one process
    and sending texts, with 1 or 2 workers."""
    source = write_one_source(tmp_path / "corpus", setup[1], kind)
    reader = SourceReader(load_config(flags={"sources": [source], "tokenizer": "t"}).sources[0])
    assert reader.reads_by_range() and len(list(reader.ranges(prepare.RANGE_BYTES))) >= 8
    cfg = dict(sources=[source], shard_tokens=3000)
    with monkeypatch.context() as patch:
        patch.setattr(SourceReader, "reads_by_range", lambda self: False)
        sent = prepare_data(config_for(setup, tmp_path / "sent", **cfg), show_progress=False)
    one = prepare_data(config_for(setup, tmp_path / "w1", **cfg), show_progress=False)
    two = prepare_data(config_for(setup, tmp_path / "w2", workers=2, **cfg), show_progress=False)
    assert folder_bytes(one) == folder_bytes(sent) == folder_bytes(two)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["skipped"].get("invalid_utf8", 0) >= 1 and manifest["sources"][0]["exhausted"]
    assert len(manifest["splits"]["train"]["shards"]) > 2
    if kind == "paragraphs":
        assert manifest["sources"][0]["files"][0]["text_unit"] == "paragraph"


@pytest.mark.parametrize("scan_block", [1 << 16, 3])  # 3: lines longer than a scan block
@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_ranges_cut_only_where_a_unit_starts(setup, tmp_path, monkeypatch, unit, scan_block):
    """Whatever the range size, cuts fall right after a newline (after a blank line for paragraphs),
    never inside a UTF-8 character or between "\\r" and "\\n", and the ranges read elsewhere and counted
    in order give the documents, counts and cursor of one reader."""
    from slmforge.text import sources
    from slmforge.text.sources import SourceConfig

    monkeypatch.setattr(sources, "_SCAN_BLOCK", scan_block)

    lines = awkward_lines({lang: d[:12] for lang, d in setup[1].items()})
    data = b"\xef\xbb\xbf" + b"".join(line + (b"\n" if i % 4 == 3 else b"") for i, line in enumerate(lines))
    path = tmp_path / "c.txt"
    path.write_bytes(data + "अंत बिना newline".encode())
    data = path.read_bytes()
    source = SourceConfig(path=str(path), text_unit=unit)
    whole = SourceReader(source)
    expected = list(whole)
    for range_bytes in (1, 2, 3, 5, 17, 100, 1000, 10**6):
        reader = SourceReader(source)
        jobs = list(reader.ranges(range_bytes))
        parts = [part for job in jobs for part in job.ranges]
        assert parts[0].start == 0 and parts[-1].end == len(data)
        assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
        for cut in [part.end for part in parts[:-1]]:
            assert data[cut - 1] == ord("\n") and not 0x80 <= data[cut] < 0xC0
            if unit == "paragraph":
                assert not data[data.rfind(b"\n", 0, cut - 1) + 1:cut].strip()
        texts = []
        for job in jobs:
            read, counted = job.read()
            texts += read
            for part, (stats, lines_read) in zip(job.ranges, counted):
                reader.count_range(part, stats, lines_read)
        assert texts == expected
        assert reader.stats.to_dict() == whole.stats.to_dict()
        assert reader.cursor() == {"file": 1, "offset": 0, "line": 0}
    if unit == "line":
        assert len(list(SourceReader(source).ranges(1))) == data.count(b"\n") + 1  # every line its own range


@pytest.mark.parametrize("calls,error,crash_workers,resume_workers", [
    (7, Crash, 2, 1), (12, KeyboardInterrupt, 1, 2), (16, Crash, 2, 2)])
def test_one_file_resumes_mid_file_to_identical_bytes(setup, tmp_path, monkeypatch, calls, error,
                                                      crash_workers, resume_workers):
    source = write_one_source(tmp_path / "corpus", setup[1], "lines")
    cfg = dict(sources=[source], shard_tokens=1500)
    reference = prepare_data(config_for(setup, tmp_path / "ref", **cfg), show_progress=False)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_after(patch, calls, error)
        with pytest.raises(error):
            prepare_data(config_for(setup, out, workers=crash_workers, **cfg), show_progress=False)
    progress = json.loads((out / PROGRESS).read_text())
    size = Path(source["path"]).stat().st_size
    assert 0 < progress["cursors"][0]["offset"] < size and progress["cursors"][0]["file"] == 0  # mid-file
    assert progress["interleaver"]["draws"] == progress["documents"] > 0
    prepare_data(config_for(setup, out, workers=resume_workers, **cfg), show_progress=False)
    assert folder_bytes(out) == folder_bytes(reference)


def test_one_binary_file_fails_naming_it_when_read_in_ranges(setup, tmp_path, monkeypatch):
    blob = tmp_path / "photo.txt"
    rng = random.Random(1)
    blob.write_bytes(bytes(rng.randrange(256) for _ in range(100_000)))
    with pytest.raises(SlmforgeError, match=r"photo\.txt: [\d,]+ of [\d,]+ lines are not UTF-8 \(first at line "
                                            r"\d+\): a binary file or another encoding\?") as in_ranges:
        prepare_data(config_for(setup, tmp_path / "out", sources=[{"path": str(blob)}], workers=2),
                     show_progress=False)
    monkeypatch.setattr(SourceReader, "reads_by_range", lambda self: False)
    with pytest.raises(SlmforgeError) as sent:
        prepare_data(config_for(setup, tmp_path / "sent", sources=[{"path": str(blob)}]), show_progress=False)
    assert str(in_ranges.value) == str(sent.value)  # the same counts and first line


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_refused_after_a_clean_head_leaves_nothing_behind(setup, tmp_path, workers):
    """Ranges are written as they come back, so documents from the file's clean head exist before its
    share of non-UTF-8 lines is known; a refused file still leaves the output folder as it was found,
    and the rerun after fixing the file starts afresh."""
    root, docs, _ = setup
    corpus = tmp_path / "photo.txt"
    head = (root / "corpus" / "en.txt").read_bytes()
    rng = random.Random(2)
    corpus.write_bytes(head + bytes(rng.randrange(256) for _ in range(300_000)))
    out = tmp_path / "out"
    with pytest.raises(SlmforgeError, match="are not UTF-8"):
        prepare_data(config_for(setup, out, sources=[{"path": str(corpus)}], workers=workers), show_progress=False)
    assert not out.exists()
    corpus.write_bytes(head)  # fixed
    prepare_data(config_for(setup, out, sources=[{"path": str(corpus)}], workers=workers), show_progress=False)
    assert (out / "manifest.json").is_file()
