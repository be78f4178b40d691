"""Fine-tuning: examples, chat template, prompt masking, packing, LoRA, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at_step, word_level_tokenizer
from safetensors.torch import load_file

from slmforge import config
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import ExamplesConfig, FinetuneConfig
from slmforge.finetune.examples import Skipped, read_examples
from slmforge.finetune.loader import ExampleLoader, pack_rows
from slmforge.finetune.run import finetune
from slmforge.finetune.templates import ExampleEncoder, choose_template
from slmforge.finetune.vocab import add_special_tokens
from slmforge.models import build_model, config_from_dict
from slmforge.objectives.clm import CausalLM

WORDS = [f"w{i}" for i in range(12)] + ["user", "assistant", "system", "reverse:"]


def reverse_examples(count: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        words = [f"w{i}" for i in rng.integers(0, 12, size=rng.integers(2, 6))]
        rows.append({"prompt": "reverse: " + " ".join(words), "response": " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_tokenizer(tmp_path):
    base = word_level_tokenizer(tmp_path / "tok", WORDS)
    choice = choose_template("chat", "chatml", None)
    tokenizer, _ = add_special_tokens(base, choice.added_tokens, choice.source)
    return tokenizer, choice


def encoded(tokenizer, choice, rows, task="chat"):
    encoder = ExampleEncoder(tokenizer, choice, task)
    cfg = ExamplesConfig(train_files=["x"])
    from slmforge.finetune.examples import parse_example

    return [encoder.encode(parse_example(r, cfg, f"row {i}")) for i, r in enumerate(rows)]


def tiny_model(vocab_size: int, seed: int = 0):
    cfg = config_from_dict({"preset": "test-tiny", "vocab_size": vocab_size})
    return build_model(cfg, device="cpu", seed=seed)


def test_chatml_ids_equal_transformers_apply_chat_template(chat_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer, choice = chat_tokenizer
    tokenizer.save(tmp_path / "run-tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "run-tok")
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "reverse: w1 w2 w3"},
                {"role": "assistant", "content": "w3 w2 w1"}]
    ours = encoded(tokenizer, choice, [{"messages": messages}])[0]
    theirs = hf.apply_chat_template(messages, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours.ids.tolist() == list(theirs)
    # Loss only on the response and its end-of-turn marker.
    scored = tokenizer.decode(ours.ids[ours.scored].tolist(), skip_special=False)
    assert scored.split() == ["w3", "w2", "w1", "<|im_end|>"]
    prompt = hf.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert ours.ids[:ours.prompt_len].tolist() == list(prompt)


def test_prompt_tokens_contribute_exactly_zero_gradient(chat_tokenizer):
    tokenizer, choice = chat_tokenizer
    examples = encoded(tokenizer, choice, reverse_examples(4, seed=0))
    loader = ExampleLoader(examples, 64, 4, packing=False, pad_id=tokenizer.pad_id, shuffle=False)
    objective = CausalLM()
    batch = objective.collate(loader.next_batch())
    model = tiny_model(tokenizer.vocab_size)
    hidden = {}

    def keep(module, args, out):
        out.retain_grad()
        hidden["h"] = out

    model.norm.register_forward_hook(keep)
    loss, _ = objective.loss(model, batch)
    loss.backward()
    grad = hidden["h"].grad.abs().sum(-1)  # (B, T): gradient reaching each position's output
    scored = batch["targets"] != -100
    assert torch.all(grad[~scored] == 0)
    assert torch.all(grad[scored] > 0)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(chat_tokenizer):
    tokenizer, choice = chat_tokenizer
    examples = encoded(tokenizer, choice, reverse_examples(12, seed=1))
    objective = CausalLM()
    results = []
    for packing in (False, True):
        loader = ExampleLoader(examples, 64, 12, packing=packing, pad_id=tokenizer.pad_id, shuffle=False,
                               training=False)
        model = tiny_model(tokenizer.vocab_size)
        total, count = 0.0, 0
        for raw in loader.epoch_batches():
            batch = objective.collate(raw)
            n = int((batch["targets"] != -100).sum())
            loss, _ = objective.loss(model, batch)
            (loss * n).backward()
            total, count = total + loss.item() * n, count + n
        assert count == sum(int(e.scored[1:].sum()) for e in examples)
        results.append((total / count, {k: p.grad.clone() for k, p in model.named_parameters()}))
        if packing:
            assert loader.num_windows < len(examples)  # several examples did share rows
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_a_packed_row_computes_what_each_example_alone_computes(chat_tokenizer):
    tokenizer, choice = chat_tokenizer
    examples = encoded(tokenizer, choice, reverse_examples(3, seed=2))
    model = tiny_model(tokenizer.vocab_size).eval()
    ids = torch.from_numpy(np.concatenate([e.ids for e in examples]))[None]
    documents = torch.cat([torch.full((len(e.ids),), i) for i, e in enumerate(examples)])[None]
    packed = model(ids, document_ids=documents)[0]
    at = 0
    for e in examples:
        alone = model(torch.from_numpy(e.ids)[None])[0]
        torch.testing.assert_close(packed[at:at + len(e.ids)], alone, rtol=1e-5, atol=1e-5)
        at += len(e.ids)


def test_pack_rows_fills_rows_and_keeps_every_example_once():
    lengths = [30, 5, 17, 9, 40, 3, 22, 11]
    rows = pack_rows(lengths, 41)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 41 for row in rows)
    assert len(rows) == 4  # 137 tokens need at least 4 rows of 41


# ---------------------------------------------------------------- end to end


def finetune_config(tmp_path, *overrides, examples: int = 400):
    tokenizer_dir = tmp_path / "tok"
    if not tokenizer_dir.exists():
        word_level_tokenizer(tokenizer_dir, WORDS)
    train = write_jsonl(tmp_path / "train.jsonl", reverse_examples(examples, seed=3))
    val = write_jsonl(tmp_path / "val.jsonl", reverse_examples(24, seed=4))
    return config.load(FinetuneConfig, overrides=[
        "model.preset=test-tiny", f"finetune.tokenizer={tokenizer_dir}",
        f'finetune.train_files=["{train}"]', f'finetune.val_files=["{val}"]', "train.seq_len=40",
        "train.batch_size=16", "train.max_steps=30", "train.log_every=10", "train.eval_every=0",
        "train.save_every=10", "optim.lr=1e-2", "schedule.warmup_steps=5", "finetune.eval_samples=8",
        "finetune.max_new_tokens=8", f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_a_tiny_model_learns_to_reverse_words(tmp_path, capsys):
    run = finetune(finetune_config(tmp_path, "train.max_steps=300", "train.save_every=300",
                                   "finetune.eval_samples=24", "model.num_layers=3", "model.hidden_size=64",
                                   "model.intermediate_size=192", "optim.lr=3e-3", "schedule.warmup_steps=20",
                                   examples=5000))
    report = json.loads((run / "checkpoints" / "step-000300" / "eval.json").read_text())["finetune_held_out"]
    assert report["exact_match"] >= 0.8, report
    assert report["loss"] < 0.3
    assert "reverse: w" in (run / "samples.md").read_text()
    # `generate --chat` renders the prompt with the run's template and stops at the end of the turn.
    from slmforge.cli import main

    capsys.readouterr()
    assert main(["generate", str(run), "--chat", "-p", "reverse: w1 w2 w3 w4", "--json", "temperature=0"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["completion"] == "w4 w3 w2 w1"
    # `eval --examples` scores a file of examples in the run's own format.
    assert main(["eval", str(run), "--examples", f"held={tmp_path / 'val.jsonl'}", "--samples", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["held"]
    assert row["loss"] == pytest.approx(report["loss"], rel=1e-4) and row["answered"] == 4
    assert (run / "checkpoints" / "step-000300" / "samples-held.md").is_file()


def test_untrained_model_does_not_reverse_words(tmp_path):
    """The control for the test above: the same evaluation on a model that has not learned the task."""
    run = finetune(finetune_config(tmp_path, "train.max_steps=1", "optim.lr=1e-9"))
    report = json.loads((run / "checkpoints" / "step-000001" / "eval.json").read_text())["finetune_held_out"]
    assert report["exact_match"] == 0.0


def test_lora_trains_only_adapters_and_resumes_exactly(tmp_path, monkeypatch):
    pytest.importorskip("peft")

    base = finetune(finetune_config(tmp_path, "train.max_steps=10", f"train.out_dir={tmp_path / 'base'}",
                                    "finetune.eval_samples=0"))
    common = (f"train.init_from={base}", "lora.rank=4", "lora.dropout=0.1", "train.max_steps=20",
              "finetune.eval_samples=0", "optim.lr=1e-2")
    straight = finetune(finetune_config(tmp_path, *common, f"train.out_dir={tmp_path / 'straight'}"))

    with crash_at_step(monkeypatch, 14):
        finetune(finetune_config(tmp_path, *common, f"train.out_dir={tmp_path / 'resumed'}"))
    resumed = finetune(finetune_config(tmp_path, *common, f"train.out_dir={tmp_path / 'resumed'}"))

    final = "checkpoints/step-000020"
    for name in ("model.safetensors", "adapter_model.safetensors"):
        a, b = load_file(straight / final / name), load_file(resumed / final / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # The base is bitwise the model it started from; only the adapters moved.
    start = load_file(base / "checkpoints" / "step-000010" / "model.safetensors")
    kept = load_file(straight / "base" / "model.safetensors")
    grown = {k for k in start if start[k].shape != kept[k].shape}
    assert grown == set()  # the chat tokens were already in the base run's tokenizer
    for key in start:
        assert torch.equal(start[key], kept[key]), key
    adapter = load_file(straight / final / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(k.startswith("base_model.model.") for k in adapter)
    merged = load_file(straight / final / "model.safetensors")
    assert merged.keys() == start.keys()
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "gate_proj.weight", "up_proj.weight", "down_proj.weight")) for k in changed)


# ---------------------------------------------------------------- bad input


def test_bad_lines_name_file_and_line_or_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "a", "response": "b"},
        {"prompt": "a"},
        {"prompt": "a", "response": "  "},
        "{not json",
        {"messages": [{"role": "user", "content": "hi"}]},
    ])
    cfg = ExamplesConfig(train_files=[str(path)])
    with pytest.raises(SlmforgeError, match=r"bad.jsonl:2: no field 'response'"):
        read_examples([str(path)], cfg, Skipped())
    cfg.on_bad_example = "skip"
    skipped = Skipped()
    examples = read_examples([str(path)], cfg, skipped)
    assert len(examples) == 1 and skipped.total == 4
    assert skipped.counts == {"missing field": 1, "empty response": 1, "invalid JSON": 1, "no assistant message": 1}


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(SlmforgeError, match=r"latin1.jsonl:2: not UTF-8"):
        read_examples([str(path)], ExamplesConfig(train_files=[str(path)]), Skipped())


def test_an_example_longer_than_the_context_is_refused_or_skipped(tmp_path):
    long = {"prompt": "reverse: " + " ".join(["w1"] * 80), "response": "w1"}
    rows = reverse_examples(30, seed=5) + [long]  # line 31
    write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = finetune_config(tmp_path, "train.max_steps=1", "finetune.eval_samples=0", "train.batch_size=4")
    cfg.finetune.train_files = [str(tmp_path / "long.jsonl")]
    with pytest.raises(SlmforgeError, match=r"long.jsonl:31: \d+ tokens, more than train.seq_len \+ 1 = 41"):
        finetune(cfg)
    cfg.finetune.on_bad_example = "skip"
    cfg.train.out_dir = str(tmp_path / "skipping")
    finetune(cfg)


def test_finetune_needs_a_model_to_start_from():
    with pytest.raises(SlmforgeError, match="train.init_from: required"):
        config.load(FinetuneConfig, overrides=['finetune.train_files=["x.jsonl"]'])


# ---------------------------------------------------------------- infilling


def test_fim_examples_reassemble_the_document_and_train(tmp_path):
    from slmforge.finetune.tasks import InfillConfig, infill_examples

    documents = [" ".join(f"w{(i * 7 + j) % 12}" for j in range(8 + i % 5)) for i in range(50)]
    made = list(infill_examples(iter(documents), InfillConfig(style="fim", seed=1)))
    assert len(made) == 50
    for document, e in zip(documents, made):
        assert e["prefix"] + e["middle"] + e["suffix"] == document
        assert e["middle"] and e["prefix"].strip() and e["suffix"].strip()
    again = list(infill_examples(iter(documents), InfillConfig(style="fim", seed=1)))
    assert again == made
    blanks = list(infill_examples(iter(documents), InfillConfig(style="blanks", seed=1)))
    for document, e in zip(documents, blanks):
        answers = e["response"].split("\n")
        text = e["prompt"].removeprefix("Fill in the blanks: ")
        for answer in answers:
            text = text.replace("____", answer, 1)
        assert text == document

    write_jsonl(tmp_path / "fim.jsonl", made)
    run = finetune(finetune_config(tmp_path, "finetune.task=fim", f'finetune.train_files=["{tmp_path / "fim.jsonl"}"]',
                                   "finetune.val_files=[]", "train.max_steps=3", "finetune.eval_samples=2"))
    tokens = json.loads((run / "tokenizer" / "slmforge_tokenizer.json").read_text())
    assert tokens["vocab_size"] == len(WORDS) + 5 + 3  # the three FIM sentinels were added
    assert (run / "samples.md").is_file()


def test_lora_exports_merged_and_as_a_peft_adapter_with_equal_logits(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from slmforge.interop import export_hf
    from slmforge.interop.export_adapter import export_adapter

    base = finetune(finetune_config(tmp_path, "train.max_steps=5", f"train.out_dir={tmp_path / 'base'}",
                                    "finetune.eval_samples=0"))
    run = finetune(finetune_config(tmp_path, f"train.init_from={base}", "lora.rank=4", "lora.alpha=8",
                                   "train.max_steps=8", "finetune.eval_samples=0", "optim.lr=3e-2",
                                   f"train.out_dir={tmp_path / 'lora'}"))
    export_hf(run, tmp_path / "merged")
    export_hf(run / "base", tmp_path / "hf-base")
    export_adapter(run, tmp_path / "adapter")

    ids = torch.tensor([[1, 7, 9, 11, 3, 5, 8]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base").eval()
    with torch.no_grad():
        base_logits = plain(ids).logits
        adapted = PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
        a, b = merged(ids).logits, adapted(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, base_logits, atol=1e-3)  # the adapter did change the model

    # slmforge's own adapter forward (unmerged LoRA layers) gives the merged logits too.
    from slmforge.checkpoint.reading import load_model, resolve_checkpoint
    from slmforge.finetune.config import LoraConfig
    from slmforge.finetune.lora import apply_lora, load_adapter

    model, _, _ = load_model(run / "base")
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    load_adapter(model, resolve_checkpoint(run))
    with torch.no_grad():
        ours = model.logits(model.eval()(ids))
    torch.testing.assert_close(ours, a, rtol=1e-5, atol=1e-5)

    with pytest.raises(SlmforgeError, match="not a checkpoint of a LoRA run"):
        export_adapter(base, tmp_path / "nope")


def test_freeze_patterns_keep_those_parameters_bitwise_and_train_the_rest(tmp_path):
    base = finetune(finetune_config(tmp_path, "train.max_steps=2", f"train.out_dir={tmp_path / 'base'}",
                                    "finetune.eval_samples=0"))
    run = finetune(finetune_config(tmp_path, f"train.init_from={base}", "train.max_steps=4", "finetune.eval_samples=0",
                                   'finetune.freeze=["embed.*", "layers.0.*"]', f"train.out_dir={tmp_path / 'frozen'}"))
    start = load_file(base / "checkpoints" / "step-000002" / "model.safetensors")
    end = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    for name in start:
        frozen = name.startswith(("embed.", "layers.0."))
        assert torch.equal(start[name], end[name]) == frozen, name
    with pytest.raises(SlmforgeError, match=r"finetune.freeze: 'layer.*' matches no parameter"):
        finetune(finetune_config(tmp_path, f"train.init_from={base}", 'finetune.freeze=["layer.*"]',
                                 f"train.out_dir={tmp_path / 'typo'}"))


def test_a_template_whose_stop_token_is_not_a_token_is_refused(chat_tokenizer):
    from slmforge.finetune.templates import TemplateChoice

    tokenizer, _ = chat_tokenizer
    base = word_level_tokenizer_without_chat(tokenizer)
    with pytest.raises(SlmforgeError, match="ends answers with '<\\|im_end\\|>', which is not a token"):
        ExampleEncoder(base, TemplateChoice("{{ messages }}<|im_end|>", (), "<|im_end|>"), "chat")


def word_level_tokenizer_without_chat(tokenizer):
    """The tokenizer as it was before the chat markers were added."""
    from tokenizers import Tokenizer as Backend

    from slmforge.tokenizer import Tokenizer

    data = json.loads(tokenizer.backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if "im_" not in t["content"]]
    return Tokenizer(Backend.from_str(json.dumps(data)), dict(tokenizer.roles))


def test_rows_longer_than_the_models_context_are_refused(tmp_path):
    with pytest.raises(SlmforgeError, match="train.seq_len: 100 exceeds the model's context, model.max_seq_len = 64"):
        finetune(finetune_config(tmp_path, "train.seq_len=100", "train.max_steps=1"))


def test_make_infill_refuses_utf16_and_counts_lines_that_are_not_utf8(tmp_path, capsys):
    from slmforge.finetune.tasks import InfillConfig, write_infill_file

    text = "हिन्दी भाषा और साहित्य का इतिहास बहुत पुराना है\n" * 3
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    with pytest.raises(SlmforgeError, match=r"utf16.txt: UTF-16 text .* iconv -f UTF-16 -t UTF-8"):
        write_infill_file([str(tmp_path / "utf16.txt")], tmp_path / "out.jsonl", InfillConfig())
    (tmp_path / "mixed.txt").write_bytes(text.encode() + b"caf\xe9 au lait avec du sucre et du lait\n")
    assert write_infill_file([str(tmp_path / "mixed.txt")], tmp_path / "out.jsonl", InfillConfig()) == 3
    assert "mixed.txt: 1 invalid_utf8" in capsys.readouterr().err


def test_resuming_with_another_lora_setting_names_it(tmp_path):
    run = finetune(finetune_config(tmp_path, "train.max_steps=2", "finetune.eval_samples=0"))
    with pytest.raises(SlmforgeError, match=r"resuming with changes .*\(lora.rank 0 -> 4\)"):
        finetune(finetune_config(tmp_path, "train.max_steps=4", "finetune.eval_samples=0", "lora.rank=4",
                                 f"train.out_dir={run}"))
