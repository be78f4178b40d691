"""`slmforge eval RUN --tasks ...`: lm-evaluation-harness tasks on slmforge's own model and batching.

Parity: on the exported model, lm-eval's own HF backend (`HFLM(pretrained=DIR)`) gives the same scores,
and every request the same log-likelihood (1e-4) and the same greedy flags and generated text, on local
tasks (YAML + JSONL in a temporary folder, no network): multiple choice with and without a context,
perplexity over texts longer than the model's context, and generation until a stop string.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize_weights

from slmforge.errors import SlmforgeError
from slmforge.eval import harness
from slmforge.models import DecoderConfig, build_model

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is an optional extra (pip install 'slmforge[eval]')")
TOLERANCE = 1e-4
VOCAB = 320
CONTEXT = 64  # short, so that the perplexity texts need several windows

MULTIPLE_CHOICE = [
    {"question": "the quick brown", "choices": ["fox", "dog", "cat jumps"], "label": 0},
    {"question": "hello 123", "choices": ["world", "there", "world hello 123 the lazy dog"], "label": 0},
    {"question": "नमस्ते", "choices": ["दुनिया", "यह एक परीक्षण है", "the lazy dog"], "label": 1},
    {"question": "the lazy dog jumps over the lazy dog and the quick brown fox jumps over the lazy dog "
                 "again and again, hello world", "choices": ["fox", "quick brown fox", "123"], "label": 2},
    {"question": "the quick brown fox ", "choices": ["jumps", "sleeps"], "label": 0},  # trailing space
]
# xnli's layout: no context at all, the premise inside every choice (lm-eval conditions on bos).
NO_CONTEXT = [{"premise": "the quick brown fox", "choices": ["the quick brown fox, right? yes", "hello world"],
               "label": 0},
              {"premise": "नमस्ते दुनिया", "choices": ["नमस्ते दुनिया, यह एक परीक्षण है", "123"], "label": 1}]
WORDS = "the quick brown fox jumps over lazy dog hello 123 world नमस्ते दुनिया यह एक परीक्षण है।".split()
# Not periodic: lm-eval 0.4's HF backend scores two rolling windows whose tokens (but the last) are
# equal as one and then reads the second one's log-probabilities from the wrong positions (its
# logits cache); a repeated sentence makes such windows. See test_rolling_windows_of_a_repeated_text.
TEXTS = [{"text": " ".join(WORDS[(i * 7 + i * i) % len(WORDS)] for i in range(150))},
         {"text": "नमस्ते दुनिया, यह एक परीक्षण है। " * 4},
         {"text": "hello 123 world"}]


def task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def in_words(rows: list[dict], spell) -> list[dict]:
    """`rows` with every string (and list of strings) passed through `spell`."""
    def convert(value):
        return spell(value) if isinstance(value, str) else [convert(v) for v in value] if isinstance(value, list) else value

    return [{key: convert(value) for key, value in row.items()} for row in rows]


def write_tasks(folder: Path, spell=None) -> Path:
    """Four local tasks in lm-eval's YAML, their data in JSONL beside them (texts through `spell`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MULTIPLE_CHOICE), ("nocontext", NO_CONTEXT), ("texts", TEXTS)):
        rows = in_words(rows, spell) if spell else rows
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    accuracy = ("metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "slm_mc.yaml").write_text(task_yaml("slm_mc", folder / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n" + accuracy)), encoding="utf-8")
    (folder / "slm_nocontext.yaml").write_text(task_yaml("slm_nocontext", folder / "nocontext.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"\"\ndoc_to_choice: \"{{choices}}\"\ntarget_delimiter: \"\"\n"
        "doc_to_target: label\n" + accuracy)), encoding="utf-8")
    (folder / "slm_ppl.yaml").write_text(task_yaml("slm_ppl", folder / "texts.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")), encoding="utf-8")
    (folder / "slm_gen.yaml").write_text(task_yaml("slm_gen", folder / "mc.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{choices[0]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\", \"fox\"]\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")),
        encoding="utf-8")
    return folder


def make_tokenizer(folder: Path) -> None:
    """A 300-id byte-level BPE, <pad>=0, <eos>=1, <bos>=2, bos added by its post-processor (as trained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from slmforge.tokenizer import Tokenizer as SlmforgeTokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "नमस्ते दुनिया, यह एक परीक्षण है", "hello 123 world"] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    SlmforgeTokenizer(tokenizer, {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}).save(folder)


def tiny_decoder(family: str = "llama", seed: int = 0):
    if family == "gemma3":
        cfg = DecoderConfig.from_name("gemma3-tiny", vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=4,
                                      num_kv_heads=2, head_dim=16, intermediate_size=96, max_seq_len=CONTEXT,
                                      sliding_window=8, global_every=3, query_pre_attn_scalar=16.0,
                                      final_logit_softcap=30.0)
    else:
        cfg = DecoderConfig.from_name("llama-tiny", vocab_size=VOCAB, hidden_size=64, num_layers=3,
                                      intermediate_size=96, max_seq_len=CONTEXT)
    model = build_model(cfg, seed=seed).eval()
    randomize_weights(model, seed, vector_mean=0.0 if cfg.norm_unit_offset else 1.0)  # every detail shows
    return model


def make_run(root: Path, family: str = "llama") -> tuple[Path, Path]:
    """A decoder run folder (random weights, the tokenizer above) and its `export --format hf` folder."""
    from slmforge.checkpoint.writing import save_checkpoint
    from slmforge.interop import export_hf

    run = root / "run"
    save_checkpoint(run, 3, tiny_decoder(family))
    make_tokenizer(run / "tokenizer")
    return run, export_hf(run, root / "hf")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    run, exported = make_run(root)
    return run, exported, write_tasks(root / "tasks")


def local_manager(tasks: Path):
    """A TaskManager of the local tasks only (indexing lm-eval's own thousands of tasks takes seconds)."""
    return harness.task_manager([str(tasks)], include_defaults=False)


def first(response):
    return response[0] if isinstance(response, (tuple, list)) else response


def assert_same_answers(ours: dict, theirs: dict, tasks: list[str]) -> float:
    """Every request's answer equal (log-likelihoods within TOLERANCE, greedy flags and texts exact);
    every metric equal. Returns the largest log-likelihood difference."""
    worst = 0.0
    for task in tasks:
        assert len(ours["samples"][task]) == len(theirs["samples"][task])
        for mine, their in zip(ours["samples"][task], theirs["samples"][task]):
            assert mine["arguments"] == their["arguments"]
            for a, b in zip(mine["resps"], their["resps"]):
                a, b = a[0], b[0]
                if isinstance(a, str):
                    assert a == b, (task, a, b)
                    continue
                worst = max(worst, abs(first(a) - first(b)))
                assert abs(first(a) - first(b)) <= TOLERANCE, (task, mine["arguments"], a, b)
                if isinstance(a, (tuple, list)):
                    assert a[1] == b[1], (task, "greedy flag", a, b)
        for key, value in theirs["results"][task].items():
            if "," in key and isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
    return worst


# ---------------------------------------------------------------- parity with lm-eval's HF backend


@needs_lm_eval
def test_scores_and_every_request_equal_lm_evals_hf_backend_on_the_export(llama):
    from lm_eval.models.huggingface import HFLM

    from slmforge.checkpoint.reading import open_run

    run, exported, tasks = llama
    names = ["slm_mc", "slm_nocontext", "slm_ppl", "slm_gen"]
    manager = local_manager(tasks)
    ours = harness.run_tasks(harness.backend_for(open_run(run), batch_size=3), names, manager=manager, log_samples=True)
    theirs = harness.run_tasks(HFLM(pretrained=str(exported), batch_size=4, device="cpu"), names, manager=manager,
                               log_samples=True)
    worst = assert_same_answers(ours, theirs, names)
    print(f"\nlargest |log-likelihood difference| per request: {worst:.2e}")
    # The perplexity texts really were cut into several windows of the model's context.
    ours_lm = harness.backend_for(open_run(run))
    assert len(ours_lm.tok_encode(TEXTS[0]["text"])) > 2 * CONTEXT


@needs_lm_eval
def test_gemma3_sliding_window_model_equals_hflm_too(tmp_path):
    from lm_eval.models.huggingface import HFLM

    from slmforge.checkpoint.reading import open_run

    run, exported = make_run(tmp_path, "gemma3")
    names = ["slm_mc", "slm_ppl", "slm_gen"]
    manager = local_manager(write_tasks(tmp_path / "tasks"))
    ours = harness.run_tasks(harness.backend_for(open_run(run), batch_size=3), names, manager=manager, log_samples=True)
    theirs = harness.run_tasks(HFLM(pretrained=str(exported), batch_size=4, device="cpu"), names, manager=manager,
                               log_samples=True)
    assert_same_answers(ours, theirs, names)


@needs_lm_eval
def test_encoder_decoder_log_likelihoods_equal_hflm_seq2seq(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from test_encdec import make_t5_run  # a random T5 v1.1 run with a word-level tokenizer
    from transformers import T5ForConditionalGeneration

    from slmforge.checkpoint.reading import open_run
    from slmforge.interop import export_hf

    run, model = make_t5_run(tmp_path)
    exported = export_hf(run, tmp_path / "hf")
    names = ["slm_mc", "slm_ppl"]
    # Its vocabulary is w0, w1, ...: every word of the tasks becomes one of them (no <unk> ties).
    seen = sorted({w for rows in (MULTIPLE_CHOICE, NO_CONTEXT, TEXTS) for row in rows for v in row.values()
                   for text in (v if isinstance(v, list) else [v]) if isinstance(text, str) for w in text.split()})
    spelled = {word: f"w{i}" for i, word in enumerate(seen)}
    assert len(spelled) <= 56
    manager = local_manager(write_tasks(tmp_path / "tasks", lambda text: " ".join(spelled[w] for w in text.split())))
    ours = harness.run_tasks(harness.backend_for(open_run(run), batch_size=3), names, manager=manager, log_samples=True)
    # HFLM reads the context from T5's config (512 positions) unless told; and it calls tie_weights(),
    # which under transformers 5 (T5 configs always say tied) ties this untied v1.1 head to the
    # embedding: the head is put back, so that HFLM scores the exported model.
    theirs_lm = HFLM(pretrained=str(exported), batch_size=4, device="cpu", max_length=model.cfg.max_seq_len)
    head = T5ForConditionalGeneration.from_pretrained(exported).lm_head.weight.detach().clone()
    theirs_lm.model.lm_head.weight = torch.nn.Parameter(head)
    theirs = harness.run_tasks(theirs_lm, names, manager=manager, log_samples=True)
    assert_same_answers(ours, theirs, names)
    with pytest.raises(SlmforgeError, match="generate_until tasks need a decoder"):
        harness.run_tasks(harness.backend_for(open_run(run)), ["slm_gen"], manager=manager)


@needs_lm_eval
def test_rolling_windows_of_a_repeated_text(llama):
    """A repeated sentence: windows 2 and 3 of the text have the same tokens but the last, which lm-eval's
    HF backend (logits_cache, its default) scores as one, reading window 3's log-probabilities from
    window 2's first positions instead of its last ones. Ours equals one forward pass per window, and
    HFLM with its logits cache off."""
    from lm_eval import utils as lm_utils
    from lm_eval.models.huggingface import HFLM

    from slmforge.checkpoint.reading import open_run

    run, exported, _ = llama
    ours = harness.backend_for(open_run(run), batch_size=3)
    tokens = ours.tok_encode("the quick brown fox jumps over the lazy dog " * 20)
    windows = [(None, c, x) for c, x in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
        tokens, ours.prefix_token_id, CONTEXT, 1))]
    mine = ours._loglikelihood_tokens(windows)
    theirs = HFLM(pretrained=str(exported), batch_size=4, device="cpu", logits_cache=False)._loglikelihood_tokens(windows)
    with torch.no_grad():
        for (_, context, continuation), (value, _), (their, _) in zip(windows, mine, theirs):
            logits = ours.model.logits(ours.model(torch.tensor([(context + continuation)[:-1]])))[0]
            expected = logits.log_softmax(-1)[-len(continuation):].gather(-1, torch.tensor(continuation)[:, None]).sum()
            assert abs(value - float(expected)) <= TOLERANCE and abs(value - their) <= TOLERANCE


@needs_lm_eval
def test_context_and_continuation_tokens_follow_lm_evals_hf_backend(llama):
    from lm_eval.models.huggingface import HFLM

    from slmforge.checkpoint.reading import Run, open_run

    run, exported, _ = llama
    opened = open_run(run)
    ours = harness.backend_for(opened)
    theirs = HFLM(pretrained=str(exported), batch_size=1, device="cpu")
    for context, continuation in [("the quick brown", " fox"), ("the quick brown ", "fox"), ("नमस्ते", " दुनिया"),
                                  ("hello 123", "4 world"), ("<bos>the lazy", " dog")]:
        assert ours._encode_pair(context, continuation) == theirs._encode_pair(context, continuation)
        assert ours.tok_encode(context + continuation) == theirs.tok_encode(context + continuation)
    assert ours.prefix_token_id == theirs.prefix_token_id == 2 and ours.eot_token_id == theirs.eot_token_id == 1
    assert ours.max_length == theirs.max_length == CONTEXT
    # A run trained without bos (meta.json add_bos = false): no bos, and eos conditions an empty context.
    plain = harness.backend_for(Run(opened.model, opened.step_dir, {**opened.meta, "add_bos": False}))
    assert plain.tok_encode("hello") == ours.tok_encode("hello")[1:]
    assert plain.prefix_token_id == 1


# ---------------------------------------------------------------- the command line and eval.json


@needs_lm_eval
def test_eval_tasks_writes_eval_json_and_prints_a_table(llama, capsys, monkeypatch):
    from slmforge.cli import main

    run, _, tasks = llama
    manager = local_manager(tasks)
    monkeypatch.setattr(harness, "task_manager", lambda include_path=None, include_defaults=True: manager)
    assert main(["eval", str(run), "--tasks", "slm_mc,slm_ppl", "--include-path", str(tasks), "--limit", "3",
                 "--batch-size", "2", "--num-fewshot", "1"]) == 0
    out = capsys.readouterr().out
    assert "slm_mc" in out and "acc_norm" in out and "bits_per_byte" in out and "lm-eval 0.4" in out
    report = json.loads((run / "checkpoints" / "step-000003" / "eval.json").read_text(encoding="utf-8"))
    row = report["lm-eval:slm_mc"]
    assert row["lm_eval_version"] == harness.lm_eval_version() and row["task"] == "slm_mc"
    assert len(row["config_sha256"]) == 64 and row["output_type"] == "multiple_choice"
    assert set(row["metrics"]) == {"acc", "acc_norm"} and row["accuracy"] == row["metrics"]["acc"]
    assert row["samples"] == 3 and row["limit"] == 3 and row["num_fewshot"] == 1
    assert report["lm-eval:slm_ppl"]["bpb"] == report["lm-eval:slm_ppl"]["metrics"]["bits_per_byte"]
    # The same tasks again: the same hash; a later eval keeps the entries it does not measure.
    assert main(["eval", str(run), "--tasks", "slm_mc", "--include-path", str(tasks), "--limit", "3",
                 "--num-fewshot", "1", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["lm-eval:slm_mc"]["config_sha256"] == row["config_sha256"]
    assert "lm-eval:slm_ppl" in json.loads((run / "checkpoints" / "step-000003" / "eval.json").read_text())


@needs_lm_eval
def test_unknown_task_and_unreachable_data_are_one_line_errors_naming_the_task(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    folder = tmp_path / "tasks"
    folder.mkdir()
    # A task whose data lives on the Hub, looked for with the network off (as on a machine without one).
    (folder / "remote.yaml").write_text("task: remote_task\ndataset_path: slmforge-tests/never-cached\n"
                                        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{q}}\"\n"
                                        "doc_to_choice: \"{{c}}\"\ndoc_to_target: 0\n", encoding="utf-8")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    manager = local_manager(folder)
    with pytest.raises(SlmforgeError) as caught:
        harness.load_tasks(manager, ["remote_task"])
    message = str(caught.value)
    assert "remote_task" in message and "offline" in message and "slmforge-tests/never-cached" in message
    assert "\n" not in message
    with pytest.raises(SlmforgeError, match="knows no task 'belebele_xyz'"):
        harness.load_tasks(manager, ["belebele_xyz"])


def test_without_lm_eval_the_core_imports_and_eval_tasks_says_how_to_install(tmp_path, monkeypatch, capsys):
    code = ("import sys, slmforge.cli, slmforge.eval.commands, slmforge.eval.harness; "
            "assert 'lm_eval' not in sys.modules, 'imported lm_eval'")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails, as when not installed
    with pytest.raises(SlmforgeError, match=r"pip install 'slmforge\[eval\]'"):
        harness.require_lm_eval()
    from slmforge.cli import main

    assert main(["eval", str(tmp_path), "--tasks", "xnli_hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'slmforge[eval]'" in err and len(err.splitlines()) == 1
    assert main(["eval", "--list-tasks", "hi"]) == 2
    assert "pip install 'slmforge[eval]'" in capsys.readouterr().err


# ---------------------------------------------------------------- task lists


def test_tasks_for_a_language_fold_subtasks_and_skip_translation_grids():
    index = {name: ("task", "multiple_choice") for name in (
        "belebele_hin_Deva", "xnli_hi", "xnli_de", "global_mmlu_full_hi_anatomy", "global_mmlu_full_hi_astronomy",
        "flores_hin_Deva-eng_Latn_prompt_1", "mlqa_hi_hi", "mlqa_hi_de", "bigbench_presuppositions_as_nli_multiple_choice",
        "belebele_asm_Beng", "hellaswag", "arc_easy", "wikitext", "belebele_eng_Latn", "xnli_en", "graphite")}
    index["global_mmlu_full_hi"] = ("group", None)
    assert harness.tasks_for_language(index, "hi") == ["belebele_hin_Deva", "global_mmlu_full_hi", "mlqa_hi_hi",
                                                       "xnli_hi"]
    assert harness.tasks_for_language(index, "as") == ["belebele_asm_Beng"]  # not ..._as_nli_...
    assert harness.tasks_for_language(index, "de") == ["xnli_de"]
    assert harness.tasks_for_language(index, "en") == ["arc_easy", "hellaswag", "wikitext", "xnli_en",
                                                       "belebele_eng_Latn"]
    assert harness.language_code("Hindi") == "hi"
    with pytest.raises(SlmforgeError, match="unknown language 'xx'"):
        harness.language_code("xx")


@needs_lm_eval
@pytest.mark.slow
def test_list_tasks_reads_the_installed_registry(capsys):
    """The installed lm-eval's registry (indexing its task folder: seconds) per language."""
    from slmforge.cli import main

    assert main(["eval", "--list-tasks", "hi", "as", "bn", "mr", "ta", "de", "en"]) == 0
    out = capsys.readouterr().out
    for name in ("belebele_hin_Deva", "xnli_hi", "belebele_asm_Beng", "belebele_ben_Beng", "belebele_mar_Deva",
                 "belebele_tam_Taml", "xnli_de", "belebele_deu_Latn", "hellaswag", "wikitext"):
        assert f"  {name} " in out, name
    assert "flores_" not in out


# ---------------------------------------------------------------- the scoring itself (no lm-eval needed)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shared_and_unshared_batches_equal_one_forward_per_request(family):
    """Contexts shared by several continuations (KV cache copied per row, left padding) and contexts of
    their own (right padding), cut at the context length, in batches of every size: the same
    log-likelihoods as one unbatched forward per request."""
    model = tiny_decoder(family, seed=1)
    generator = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    requests = []
    for length in (5, 17, 40, 63, 90):  # 90: longer than the context, cut from the left
        context = ids(length)
        requests += [(context, ids(n)) for n in (1, 3, 7)]
    requests += [(ids(12), ids(4)), (ids(30), ids(1)), ([2], ids(CONTEXT))]
    expected = []
    with torch.no_grad():
        for context, continuation in requests:
            whole = (context + continuation)[-(CONTEXT + 1):]
            logits = model.logits(model(torch.tensor([whole[:-1]])))[0].float().log_softmax(-1)
            picked = logits[-len(continuation):]
            target = torch.tensor(continuation)
            expected.append((float(picked.gather(-1, target[:, None]).sum()),
                             bool((picked.argmax(-1) == target).all())))
    for batch_size in (1, 4, 64):
        got = harness.continuation_logprobs(model, requests, batch_size=batch_size)
        for (value, greedy), (want, want_greedy) in zip(got, expected):
            assert abs(value - want) <= TOLERANCE and greedy == want_greedy, (batch_size, value, want)


def test_generation_until_a_stop_matches_greedy_decoding_one_prompt_at_a_time():
    from slmforge.inference.generate import SamplingConfig, generate_ids

    model = tiny_decoder("gemma3", seed=2)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (3, 11, 20)]
    batched = harness.generate_until_stop(model, prompts, 10, lambda new: False, eos_id=None)
    for prompt, new in zip(prompts, batched):
        alone = generate_ids(model, torch.tensor([prompt]), SamplingConfig(max_new_tokens=10, temperature=0.0))
        assert new == alone[0, len(prompt):].tolist()
    # A stop condition ends its row (the stopping token kept, as lm-eval cuts the text afterwards);
    # eos ends a row before it.
    eos = batched[1][-1]
    stop = lambda new: new[-2:] == batched[0][1:3]  # noqa: E731
    stopped = harness.generate_until_stop(model, prompts, 10, stop, eos_id=eos)
    for row, new in zip(batched, stopped):
        expected = row[:row.index(eos)] if eos in row else row
        ends = [n for n in range(2, len(expected) + 1) if stop(expected[:n])]
        assert new == (expected[:ends[0]] if ends else expected)



def test_generate_until_through_the_engine_equals_the_left_padded_loop(tmp_path):
    """`generate_until` (the inference engine: mixed-length prompts in one batch, rows refilled as others
    end, per-request stop strings = lm-eval's `until`, eos, max_gen_toks) gives the texts of the plain
    left-padded loop it replaced (`generate_until_stop`, then lm-eval's cut at the first stop string),
    with rows ended by a stop string, by eos and by the budget, at every batch size."""
    from slmforge.tokenizer import load_tokenizer

    make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    model = tiny_decoder("gemma3", seed=2)
    texts = ["the quick", "नमस्ते दुनिया, यह", "hello 123 world the lazy dog jumps over", "fox", "एक परीक्षण"]
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) >= 4  # mixed lengths

    def reference(until: list[str], eos: int | None) -> list[str]:
        stopped = lambda ids: any(s in tok.decode(ids) for s in until)  # noqa: E731 (as harness_lm did)
        out = []
        for ids in harness.generate_until_stop(model, prompts, 12, stopped, eos_id=eos):
            text = tok.decode(ids)
            for term in until:  # lm-eval's postprocess_generated_text
                text = text.split(term)[0]
            out.append(text)
        return out

    free = reference([], None)
    assert harness.generate_until(model, tok, prompts, 12, [], None) == free
    stop = free[0][len(free[0]) // 2:][:2]  # a stop string inside row 0's text
    plain = harness.generate_until_stop(model, prompts, 12, lambda ids: False, eos_id=None)
    eos = plain[2][6]  # a token in the middle of row 2
    until = [stop, "\n\n"]
    expected = reference(until, eos)
    ended_by_stop = [e != f and stop in f for e, f in zip(expected, free)]
    assert any(ended_by_stop) and expected[2] != free[2] and any(e == f for e, f in zip(expected, free))
    for batch_size in (1, 2, 8):
        assert harness.generate_until(model, tok, prompts, 12, until, eos, batch_size=batch_size) == expected


def test_rows_for_eval_json_keep_metrics_errors_versions_and_a_config_hash():
    results = {
        "results": {"xnli_hi": {"alias": "xnli_hi", "acc,none": 0.4, "acc_stderr,none": 0.01},
                    "xnli": {"acc,none": 0.41, "acc_stderr,none": "N/A"},
                    "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.02}},
        "configs": {"xnli_hi": {"task": "xnli_hi", "output_type": "multiple_choice", "num_fewshot": 0},
                    "gsm8k": {"task": "gsm8k", "output_type": "generate_until"}},
        "group_subtasks": {"xnli": ["xnli_hi"]},
        "versions": {"xnli_hi": 1.0}, "n-shot": {"xnli_hi": 0},
        "n-samples": {"xnli_hi": {"original": 5010, "effective": 100}},
    }
    rows = harness.harness_rows(results, limit=100)
    hi = rows["lm-eval:xnli_hi"]
    assert hi["metrics"] == {"acc": 0.4} and hi["stderr"] == {"acc": 0.01} and hi["accuracy"] == 0.4
    assert hi["task_version"] == 1.0 and hi["num_fewshot"] == 0 and hi["samples"] == 100 and hi["limit"] == 100
    assert rows["lm-eval:xnli"]["subtasks"] == ["xnli_hi"] and "stderr" not in rows["lm-eval:xnli"]
    assert rows["lm-eval:gsm8k"]["metrics"] == {"exact_match,strict-match": 0.1}
    changed = {**results, "configs": {**results["configs"], "xnli_hi": {**results["configs"]["xnli_hi"], "num_fewshot": 5}}}
    assert harness.harness_rows(changed)["lm-eval:xnli_hi"]["config_sha256"] != hi["config_sha256"]
    assert harness.config_hash({"f": object()}) == harness.config_hash({"f": object()})  # no addresses
    assert harness.parse_limit("10") == 10 and harness.parse_limit("0.25") == 0.25
    with pytest.raises(SlmforgeError, match="--limit"):
        harness.parse_limit("2.5")
