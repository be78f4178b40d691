"""Qwen3 and SmolLM3 (issue 24): two families added as switches on the one decoder, not new model code.

Qwen3 = Llama + QK-norm (+ attention biases when attention_bias is set); SmolLM3 = Llama + no RoPE on the
layers its no_rope_layers marks. Each is checked as test_hf_parity.py checks Llama and Gemma 3, on tiny
random models whose sizes no preset has: transformers -> import-hf and our model -> export -> transformers,
logits within 1e-4 and greedy tokens identical to transformers' generate; then an imported model trains
further on our own data with its own tokenizer, and fine-tunes with LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from slmforge import config as config_io
from slmforge.cli import main
from slmforge.errors import SlmforgeError
from slmforge.models import DecoderConfig, build_model
from slmforge.models.hf.decoder import config_from_hf, config_to_hf, hf_name
from slmforge.models.registry import count_parameters
from slmforge.train.metrics import read_metrics

transformers = pytest.importorskip("transformers",
                                   reason="transformers is an optional extra (pip install 'slmforge[hf]')")

from test_hf_parity import (  # noqa: E402  (the parity harness the Llama and Gemma 3 checks use)
    TOLERANCE_FP32,
    VOCAB,
    compare,
    load_exported,
    make_run,
    make_tokenizer_dir,
    randomize,
    token_ids,
)

from slmforge.checkpoint.reading import load_model  # noqa: E402
from slmforge.interop import export_hf, import_hf  # noqa: E402

QWEN3 = pytest.mark.skipif(not hasattr(transformers, "Qwen3ForCausalLM"),
                           reason=f"transformers {transformers.__version__} has no Qwen3ForCausalLM (added in 4.51)")
SMOLLM3 = pytest.mark.skipif(not hasattr(transformers, "SmolLM3ForCausalLM"),
                             reason=f"transformers {transformers.__version__} has no SmolLM3ForCausalLM "
                                    f"(added in 4.53)")
MARKS = {"qwen3": QWEN3, "smollm3": SMOLLM3}

# ---------------------------------------------------------------- tiny models on the transformers side

SPECIAL_IDS = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)


def hf_qwen3(**overrides):
    # head_dim 16 with hidden 48 and 4 heads: not hidden / heads, as in every Qwen3 checkpoint.
    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=1_000_000.0,
                  tie_word_embeddings=True, **SPECIAL_IDS)
    fields.update(overrides)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))


def hf_smollm3(**overrides):
    # 5 layers with the default no_rope_layer_interval of 4: layer 3 has no RoPE.
    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=5_000_000.0, **SPECIAL_IDS)
    fields.update(overrides)
    return transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**fields))


HF_CASES = {
    "qwen3-tied": lambda: hf_qwen3(),
    "qwen3-untied-attention-bias-mqa": lambda: hf_qwen3(tie_word_embeddings=False, attention_bias=True,
                                                        num_key_value_heads=1),
    "smollm3-tied": lambda: hf_smollm3(),
    "smollm3-irregular-nope-untied-bias": lambda: hf_smollm3(no_rope_layers=[0, 1, 1, 0, 1], attention_bias=True,
                                                             tie_word_embeddings=False),
}

# ---------------------------------------------------------------- tiny models on our side

OUR_CASES = {
    "qwen3": DecoderConfig.from_name("qwen3-tiny", vocab_size=VOCAB, hidden_size=48, num_layers=3, num_heads=4,
                                     num_kv_heads=2, head_dim=16, intermediate_size=80, max_seq_len=128),
    "qwen3-untied-bias": DecoderConfig.from_name(
        "qwen3-tiny", vocab_size=VOCAB, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16,
        intermediate_size=80, max_seq_len=128, tie_embeddings=False, qkv_bias=True, out_bias=True),
    "smollm3": DecoderConfig.from_name("smollm3-tiny", vocab_size=VOCAB, hidden_size=48, num_layers=5, num_heads=4,
                                       num_kv_heads=2, intermediate_size=80, max_seq_len=128),
    "smollm3-nope-layers-untied": DecoderConfig.from_name(
        "smollm3-tiny", vocab_size=VOCAB, hidden_size=48, num_layers=5, num_heads=4, num_kv_heads=2,
        intermediate_size=80, max_seq_len=128, nope_every=0, nope_layers=[0, 2], tie_embeddings=False),
}


def marked(cases: dict) -> list:
    return [pytest.param(name, marks=MARKS[name.split("-")[0]]) for name in sorted(cases)]


def imported(tmp_path: Path, case: str):
    """A random transformers model of `case`, saved with a tokenizer and imported: (run, their model)."""
    torch.manual_seed(0)
    theirs = HF_CASES[case]().eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    return import_hf(tmp_path / "hf", tmp_path / "imported"), theirs


# ---------------------------------------------------------------- parity both ways


@pytest.mark.parametrize("case", marked(HF_CASES))
def test_import_matches_transformers(tmp_path, case):
    run, theirs = imported(tmp_path, case)
    ours, _, meta = load_model(run)
    assert meta["imported_from"]["architecture"] == type(theirs).__name__
    assert ours.cfg.family == case.split("-")[0]
    compare(ours.eval(), theirs, f"import {case}")


@pytest.mark.parametrize("case", marked(OUR_CASES))
def test_export_loads_cleanly_and_matches(tmp_path, case):
    cfg = OUR_CASES[case]
    run, ours = make_run(tmp_path, cfg)
    out = export_hf(run, tmp_path / "hf")
    theirs, _ = load_exported(out)
    assert type(theirs).__name__ == {"qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}[cfg.family]
    # The exported generation_config.json says eos = 1, and transformers 5 merges it into hf_greedy's config,
    # which asks for no eos: without this, their generation stops where ours goes on.
    theirs.generation_config.eos_token_id = None
    compare(ours, theirs, f"export {case}")
    import_hf(out, tmp_path / "again")  # and back: the same config and weights
    again, _, _ = load_model(tmp_path / "again")
    assert again.cfg == dataclasses.replace(cfg, preset=None)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@SMOLLM3
def test_nope_layers_are_visible_to_the_parity_check(tmp_path):
    """Negative control: RoPE on every layer, or NoPE on other layers, fails the 1e-4 comparison."""
    run, theirs = imported(tmp_path, "smollm3-irregular-nope-untied-bias")
    ours, _, _ = load_model(run)
    assert ours.cfg.nope_layers == [0, 3]
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        for change in (dict(nope_layers=None), dict(nope_layers=[0]), dict(nope_layers=None, nope_every=4),
                       dict(nope_layers=[1, 3])):
            wrong = build_model(dataclasses.replace(ours.cfg, **change), seed=None)
            wrong.load_state_dict(ours.state_dict())
            assert (wrong.logits(wrong(ids)) - expected).abs().max().item() > 100 * TOLERANCE_FP32, change


# ---------------------------------------------------------------- the new switches on every decoder path

PATH_CASES = {"qwen3-bias": OUR_CASES["qwen3-untied-bias"],
              "smollm3-nope-layers": OUR_CASES["smollm3-nope-layers-untied"]}


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_static_decoding_and_packed_documents_match_the_plain_forward(tmp_path, case):
    """Biases and NoPE layers reach the paths test_hf_parity does not take: generate's fixed-shape
    decode_step and packed training rows (positions restart per document)."""
    _, model = make_run(tmp_path, PATH_CASES[case])
    ids = token_ids(length=30)
    expected = model(ids)
    cache = model.new_cache(2, 36)
    steps = [model(ids[:, :4], cache=cache)]
    for t in range(4, 30):
        steps.append(model.decode_step(ids[:, t:t + 1], cache, torch.tensor(t)))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=TOLERANCE_FP32, rtol=0)
    documents = torch.tensor([[0] * 11 + [1] * 19] * 2)
    packed = model(ids, document_ids=documents)
    torch.testing.assert_close(packed[:, :11], model(ids[:, :11]), atol=TOLERANCE_FP32, rtol=0)
    torch.testing.assert_close(packed[:, 11:], model(ids[:, 11:]), atol=TOLERANCE_FP32, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_flex_attention_equals_sdpa(tmp_path, case, monkeypatch):
    from slmforge.models import flex

    monkeypatch.setattr(flex.attention_kernel, "eager", True)  # the reference implementation: fast on CPU
    monkeypatch.setattr(flex.mask_builder, "eager", True)
    _, model = make_run(tmp_path, PATH_CASES[case])
    ids, documents = token_ids(length=30), torch.tensor([[0] * 11 + [1] * 19] * 2)
    with torch.no_grad():
        expected = model(ids, document_ids=documents)
        model.set_attention("flex")
        torch.testing.assert_close(model(ids, document_ids=documents), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- config mapping (no transformers needed)

# Qwen/Qwen3-0.6B's config.json as published (written by transformers 4.51).
QWEN3_06B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_published_qwen3_06b_config_is_our_preset():
    cfg = DecoderConfig.from_name("qwen3-0.6b")
    assert config_from_hf(QWEN3_06B_CONFIG) == dataclasses.replace(cfg, preset=None)
    # Qwen3-0.6B: 0.6B parameters, 0.44B without the (tied) embedding.
    assert 0.59e9 < count_parameters(cfg) < 0.61e9
    assert 0.43e9 < count_parameters(cfg, include_embeddings=False) < 0.45e9
    assert cfg.num_parameters() == count_parameters(cfg)


def test_smollm3_3b_shape():
    cfg = DecoderConfig.from_name("smollm3-3b")
    assert [i for i in range(cfg.num_layers) if not cfg.uses_rope(i)] == list(range(3, 36, 4))  # layers 4, 8, ..., 36
    assert 3.0e9 < cfg.num_parameters() == count_parameters(cfg) < 3.2e9  # SmolLM3-3B: 3.08B
    hf = config_to_hf(cfg)
    assert hf["no_rope_layers"] == [1, 1, 1, 0] * 9 and hf["no_rope_layer_interval"] == 4
    assert config_from_hf({**hf, "no_rope_layer_interval": 7}) == dataclasses.replace(cfg, preset=None)  # list wins
    del hf["no_rope_layers"]
    assert config_from_hf(hf) == dataclasses.replace(cfg, preset=None)  # the interval alone


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-tiny", "smollm3-3b", "smollm3-tiny"])
def test_config_round_trip_of_presets(preset):
    cfg = DecoderConfig.from_name(preset)
    assert config_from_hf(config_to_hf(cfg)) == dataclasses.replace(cfg, preset=None)


def test_config_round_trip_of_variants():
    variants = [
        DecoderConfig.from_name("qwen3-tiny", qkv_bias=True, out_bias=True, tie_embeddings=False),
        DecoderConfig.from_name("qwen3-tiny", rope_scaling="linear", rope_scaling_factor=4.0),
        DecoderConfig.from_name("smollm3-tiny", nope_every=0),  # RoPE everywhere
        DecoderConfig.from_name("smollm3-tiny", nope_every=2, num_layers=6),
        DecoderConfig.from_name("smollm3-tiny", nope_every=0, nope_layers=[1, 2]),
        DecoderConfig.from_name("llama-tiny", qkv_bias=True, out_bias=True),  # Llama's attention_bias too
    ]
    for cfg in variants:
        assert config_from_hf(config_to_hf(cfg)) == dataclasses.replace(cfg, preset=None), cfg


def test_weight_names_of_the_new_families():
    qwen3 = DecoderConfig.from_name("qwen3-tiny", qkv_bias=True, out_bias=True)
    assert hf_name(qwen3, "layers.2.attn.q_norm.weight") == "model.layers.2.self_attn.q_norm.weight"
    assert hf_name(qwen3, "layers.0.attn.o_proj.bias") == "model.layers.0.self_attn.o_proj.bias"
    assert hf_name(qwen3, "layers.1.mlp_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    smollm3 = DecoderConfig.from_name("smollm3-tiny")
    assert hf_name(smollm3, "layers.3.attn.k_proj.weight") == "model.layers.3.self_attn.k_proj.weight"


def test_qkv_bias_without_out_bias_builds_qwen2s_attention():
    """Qwen2 puts biases on q, k and v but not o: the two switches express it (no HF mapping yet)."""
    cfg = DecoderConfig.from_name("qwen3-tiny", qk_norm=False, qkv_bias=True)
    model = build_model(cfg)
    attn = model.layers[0].attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None and torch.equal(attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias))
    assert cfg.num_parameters() == count_parameters(cfg)
    with pytest.raises(SlmforgeError, match="model.out_bias"):  # Qwen3's attention_bias is all four or none
        config_to_hf(dataclasses.replace(cfg, qk_norm=True))


@pytest.mark.parametrize("changes, named", [
    (dict(architectures=["Qwen3ForCausalLM"], use_sliding_window=True, sliding_window=64), "use_sliding_window"),
    (dict(architectures=["Qwen3ForCausalLM"], layer_types=["sliding_attention"] * 4), "layer_types"),
    (dict(architectures=["Qwen3ForCausalLM"], hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["SmolLM3ForCausalLM"], no_rope_layers=[1, 1, 0]), "no_rope_layers"),
    (dict(architectures=["SmolLM3ForCausalLM"], no_rope_layers=[1, 2, 1, 1]), "no_rope_layers"),
    (dict(architectures=["SmolLM3ForCausalLM"], no_rope_layers="1101"), "no_rope_layers"),
    (dict(architectures=["SmolLM3ForCausalLM"], mlp_bias=True), "mlp_bias"),
])
def test_unsupported_config_fields_are_named(changes, named):
    base = config_to_hf(DecoderConfig.from_name("qwen3-tiny"))
    with pytest.raises(SlmforgeError) as excinfo:
        config_from_hf({**base, **changes})
    message = str(excinfo.value)
    assert named in message and "\n" not in message, message


@pytest.mark.parametrize("changes, named", [
    (dict(preset="llama-tiny", nope_every=4), "model.nope_every"),
    (dict(preset="qwen3-tiny", nope_layers=[0]), "model.nope_every"),
    (dict(preset="qwen3-tiny", qk_norm=False), "model.qk_norm"),
    (dict(preset="smollm3-tiny", qk_norm=True), "model.qk_norm"),
    (dict(preset="smollm3-tiny", qkv_bias=True), "model.out_bias"),
    (dict(preset="gemma3-tiny", qkv_bias=True, out_bias=True), "model.qkv_bias"),
    (dict(preset="qwen3-tiny", sliding_window=16, global_every=2), "model.sliding_window"),
])
def test_export_refuses_what_the_class_cannot_express(changes, named):
    cfg = DecoderConfig.from_name(changes.pop("preset"), **changes)
    with pytest.raises(SlmforgeError, match=named):
        config_to_hf(cfg)


# ---------------------------------------------------------------- an imported model trains further

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello 123 world", "the lazy dog sleeps all day",
          "a quick brown dog jumps over the fox"]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "train" and "loss" in r]


def falling(values: list[float]) -> bool:
    third = max(1, len(values) // 3)
    return all(math.isfinite(v) for v in values) and sum(values[-third:]) / third < sum(values[:third]) / third


@pytest.mark.parametrize("case", [pytest.param("qwen3-tied", marks=QWEN3),
                                  pytest.param("smollm3-irregular-nope-untied-bias", marks=SMOLLM3)])
def test_imported_model_continues_pretraining_on_our_data(tmp_path, case):
    """Our own text, prepared with the imported model's tokenizer, trains the imported weights further."""
    run, _ = imported(tmp_path, case)
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS * 50) + "\n", encoding="utf-8")
    data, out = tmp_path / "data", tmp_path / "more"
    assert main(["data", "prepare", "--input", str(tmp_path / "corpus.txt"), "--tokenizer", str(run / "tokenizer"),
                 "--out", str(data)]) == 0
    assert main(["pretrain", f"train.data={data}", f"train.out_dir={out}", f"train.init_from={run}",
                 "train.seq_len=32", "train.batch_size=8", "train.max_steps=12", "train.eval_every=0",
                 "train.log_every=1", "optim.lr=3e-3", "schedule.warmup_steps=2", "train.device=cpu"]) == 0
    values = losses(out)
    print(f"\n{case}: train loss {values[0]:.3f} -> {values[-1]:.3f}")
    assert len(values) == 12 and falling(values), values
    meta = json.loads((out / "checkpoints" / "step-000012" / "meta.json").read_text(encoding="utf-8"))
    assert meta["model"]["family"] == case.split("-")[0]


@pytest.mark.parametrize("case", [pytest.param("qwen3-untied-attention-bias-mqa", marks=QWEN3),
                                  pytest.param("smollm3-tied", marks=SMOLLM3)])
def test_imported_model_finetunes_with_lora(tmp_path, case):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from slmforge.checkpoint.reading import resolve_checkpoint
    from slmforge.finetune.config import FinetuneConfig
    from slmforge.finetune.run import finetune

    run, _ = imported(tmp_path, case)
    words = "the quick brown fox jumps over the lazy dog".split()
    spans = [words[i % 6:i % 6 + 3] for i in range(60)]
    rows = [{"prompt": "reverse: " + " ".join(span), "response": " ".join(reversed(span))} for span in spans]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = finetune(config_io.load(FinetuneConfig, overrides=[
        f"train.init_from={run}", "lora.rank=4", "lora.alpha=8", f'finetune.train_files=["{tmp_path / "train.jsonl"}"]',
        "finetune.chat_template=plain", "finetune.val_fraction=0", "finetune.eval_samples=0", "train.seq_len=32",
        "train.batch_size=8", "train.max_steps=12", "train.log_every=1", "train.eval_every=0", "train.save_every=12",
        "optim.lr=1e-2", "schedule.warmup_steps=2", "train.device=cpu", f"train.out_dir={tmp_path / 'lora'}"]))
    values = losses(out)
    print(f"\n{case}: train loss {values[0]:.3f} -> {values[-1]:.3f}")
    assert len(values) == 12 and falling(values), values
    step = out / "checkpoints" / "step-000012"
    adapter = load_file(step / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    # Only the adapted projections moved; norms (QK-norm included), embeddings and biases are the imported ones.
    start = load_file(resolve_checkpoint(run) / "model.safetensors")
    merged = load_file(step / "model.safetensors")
    assert merged.keys() == start.keys()
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed
