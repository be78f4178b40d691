"""Parity with transformers for the encoder families: tiny random BERT, XLM-R / RoBERTa and ModernBERT
masked-LM models, both directions, through the same import/export code the CLI uses.

Import: a random `transformers` model, save_pretrained, `import_hf` -> our logits must match theirs
within 1e-4 in float32, also for a right-padded batch (compared on real tokens). Export: our random model
-> `export_hf` -> `AutoModelForMaskedLM.from_pretrained` with a clean load report -> the same comparison,
and back again to bit-identical weights. Sequences are longer than ModernBERT's local window, so the
window, the per-layer RoPE bases and RoBERTa's padding-aware position numbers are all exercised.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers",
                                   reason="transformers is an optional extra (pip install 'slmforge[hf]')")

from slmforge.checkpoint.reading import load_model  # noqa: E402
from slmforge.checkpoint.writing import save_checkpoint  # noqa: E402
from slmforge.errors import SlmforgeError  # noqa: E402
from slmforge.interop import export_hf, import_hf  # noqa: E402
from slmforge.models import EncoderConfig, build_model  # noqa: E402
from slmforge.models.hf.encoder import config_from_hf, config_to_hf  # noqa: E402

TOLERANCE_FP32 = 1e-4
VOCAB = 128  # >= the test tokenizers' ids
SEQ_LEN = 40  # > ModernBERT's local window below
WINDOW = 8  # ModernBERT local_attention: 4 tokens on each side
PADDING = 13  # the second row of every batch ends in this many pad tokens

# Special tokens in the order (= ids) the real tokenizers use.
BERT_SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                     mask_token="[MASK]")
ROBERTA_SPECIALS = dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                        mask_token="<mask>")
SPECIALS = {"bert": BERT_SPECIALS, "roberta": ROBERTA_SPECIALS, "modernbert": BERT_SPECIALS}
PAD_ID = {"bert": 0, "roberta": 1, "modernbert": 0}

# ---------------------------------------------------------------- tiny models on the transformers side

_BERT_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=96)


def hf_model(case: str):
    if case == "bert":
        config = transformers.BertConfig(**_BERT_SHAPE, max_position_embeddings=64, pad_token_id=0)
        return transformers.BertForMaskedLM(config)
    if case in ("xlm-roberta", "roberta"):
        # 64 usable positions: the table starts at pad_token_id + 1 = 2.
        fields = dict(_BERT_SHAPE, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      layer_norm_eps=1e-5, type_vocab_size=1 if case == "xlm-roberta" else 2)
        if case == "roberta":
            return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**fields))
        return transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**fields))
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=128, local_attention=WINDOW, global_attn_every_n_layers=3,
        global_rope_theta=160_000.0, local_rope_theta=10_000.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        cls_token_id=2, sep_token_id=3)
    return transformers.ModernBertForMaskedLM(config)


HF_FAMILY = {"bert": "bert", "xlm-roberta": "roberta", "roberta": "roberta", "modernbert": "modernbert"}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every detail (biases, norms, window, positions) moves the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1:  # LayerNorm scales around 1; biases around 0
            param.copy_((1.0 if name.endswith("norm.weight") or name.endswith("LayerNorm.weight") else 0.0)
                        + 0.3 * noise)
        else:
            param.copy_(noise / param.shape[-1] ** 0.5)


# ---------------------------------------------------------------- tiny models on our side

OUR_CASES = {
    "bert": EncoderConfig.from_name("bert-tiny", vocab_size=VOCAB, max_seq_len=64, pad_token_id=0),
    "roberta": EncoderConfig.from_name("roberta-tiny", vocab_size=VOCAB, max_seq_len=64, pad_token_id=1),
    "modernbert": EncoderConfig.from_name("modernbert-tiny", vocab_size=VOCAB, num_layers=4, local_window=WINDOW,
                                          intermediate_size=48, pad_token_id=0),
}
EXPORTED_CLASS = {"bert": "BertForMaskedLM", "roberta": "XLMRobertaForMaskedLM",
                  "modernbert": "ModernBertForMaskedLM"}


def make_run(root: Path, cfg: EncoderConfig, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A run folder with a randomised model checkpoint and a tokenizer, as training would leave it."""
    model = build_model(cfg, seed=seed).eval()
    randomize(model, seed)
    run = root / "run"
    save_checkpoint(run, 1, model)
    make_tokenizer_dir(run / "tokenizer", cfg.family)
    return run, model


# ---------------------------------------------------------------- helpers

TEXTS = ["the quick brown fox jumps over the lazy dog", "a masked language model fills in the blanks",
         "hello world, this is a tiny tokenizer"] * 10


def make_tokenizer_dir(path: Path, family: str) -> Path:
    """A tiny WordPiece tokenizer with the family's special tokens, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = SPECIALS[family]
    tokenizer = Tokenizer(models.WordPiece(unk_token=specials["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=VOCAB,
                                                                   special_tokens=list(specials.values())))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(path)
    return path


def batch(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of SEQ_LEN ids (never the pad id); the second is right-padded with PADDING pad tokens."""
    pad = PAD_ID[family]
    ids = torch.randint(pad + 1, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, -PADDING:], mask[1, -PADDING:] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def max_diff(ours, theirs, family: str, token_types: bool = False) -> float:
    """Largest |logit| difference on real tokens, over a padded batch and an unpadded one."""
    inputs = batch(family)
    if token_types:  # a second segment in the last third of each row
        inputs["token_type_ids"] = (torch.arange(SEQ_LEN) >= 2 * SEQ_LEN // 3).long().expand(2, -1)
    expected = theirs(**inputs).logits
    actual = ours.logits(ours(inputs["input_ids"], inputs["attention_mask"],
                              token_type_ids=inputs.get("token_type_ids")))
    real = inputs["attention_mask"].bool()
    diff = (actual - expected)[real].abs().max().item()
    unpadded = inputs["input_ids"][:1]
    diff_unpadded = (ours.logits(ours(unpadded)) - theirs(input_ids=unpadded).logits).abs().max().item()
    return max(diff, diff_unpadded)


def compare(ours, theirs, family: str, label: str) -> None:
    diff = max_diff(ours, theirs, family, token_types=ours.cfg.type_vocab_size > 1)
    with torch.no_grad():
        scale = theirs(**batch(family)).logits.abs().max().item()
    print(f"\n{label}: max |logit| {scale:.2f}, max abs diff {diff:.3g}")
    assert diff <= TOLERANCE_FP32, f"{label}: logits differ by {diff}"


def load_exported(out: Path):
    """AutoModelForMaskedLM.from_pretrained(out), asserting a clean load report."""
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def import_random_hf(tmp_path: Path, case: str):
    """A seeded random transformers model of `case`, saved with a tokenizer and imported; (theirs, ours)."""
    torch.manual_seed(0)
    theirs = hf_model(case).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf", HF_FAMILY[case])
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _, meta = load_model(tmp_path / "run")
    assert meta["imported_from"]["architecture"] == type(theirs).__name__
    return theirs, ours.eval()


def rewrite(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


# ---------------------------------------------------------------- import: transformers -> slmforge


@pytest.mark.parametrize("case", ["bert", "xlm-roberta", "roberta", "modernbert"])
def test_import_matches_transformers(tmp_path, case):
    theirs, ours = import_random_hf(tmp_path, case)
    assert ours.cfg.family == HF_FAMILY[case]
    compare(ours, theirs, HF_FAMILY[case], f"import {case}")


def test_window_positions_and_rope_bases_are_visible_to_the_parity_check(tmp_path):
    """Negative control: a window one token wider or narrower on each side, swapped RoPE bases, or
    RoBERTa positions counted from 0 would all fail the 1e-4 comparison."""
    theirs, ours = import_random_hf(tmp_path / "modernbert", "modernbert")
    for change in (dict(local_window=WINDOW + 2), dict(local_window=WINDOW - 2),
                   dict(rope_theta=ours.cfg.rope_local_theta, rope_local_theta=ours.cfg.rope_theta)):
        wrong = build_model(dataclasses.replace(ours.cfg, **change), seed=None)
        wrong.load_state_dict(ours.state_dict())
        assert max_diff(wrong, theirs, "modernbert") > 100 * TOLERANCE_FP32, change
    theirs, ours = import_random_hf(tmp_path / "roberta", "xlm-roberta")
    shifted = torch.roll(ours.pos_embed.weight.detach(), shifts=-1, dims=0)
    with torch.no_grad():
        ours.pos_embed.weight.copy_(shifted)  # row p now holds what position p + 1 should see
    assert max_diff(ours, theirs, "roberta") > 100 * TOLERANCE_FP32


# ---------------------------------------------------------------- export: slmforge -> transformers


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_export_loads_cleanly_and_matches(tmp_path, case):
    cfg = OUR_CASES[case]
    run, ours = make_run(tmp_path, cfg)
    out = export_hf(run, tmp_path / "hf")
    theirs = load_exported(out)
    assert type(theirs).__name__ == EXPORTED_CLASS[case]
    compare(ours, theirs, cfg.family, f"export {case}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id == PAD_ID[cfg.family] and tokenizer.mask_token_id is not None
    # And back again: the exported folder imports to the same config and bit-identical weights.
    import_hf(out, tmp_path / "again")
    again, _, _ = load_model(tmp_path / "again")
    assert again.cfg == dataclasses.replace(cfg, preset=None)
    assert again.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_exported_config_reads_the_same_in_transformers_4_and_5_forms(tmp_path):
    """ModernBERT: 4.x reads global_attn_every_n_layers / local_attention / *_rope_theta, 5.x reads
    layer_types / sliding_window / rope_parameters; each form alone gives our config back."""
    cfg = dataclasses.replace(OUR_CASES["modernbert"], rope_theta=80_000.0, rope_local_theta=5_000.0, global_every=2)
    full = config_to_hf(cfg, pad_token_id=0)
    only_5x = {k: v for k, v in full.items()
               if k not in ("global_attn_every_n_layers", "local_attention", "global_rope_theta", "local_rope_theta")}
    only_4x = {k: v for k, v in full.items() if k not in ("layer_types", "sliding_window", "rope_parameters")}
    expected = dataclasses.replace(cfg, preset=None)
    assert config_from_hf(full) == config_from_hf(only_5x) == config_from_hf(only_4x) == expected
    hf = transformers.ModernBertConfig.from_dict(full)
    assert hf.sliding_window == WINDOW // 2 and hf.layer_types == ["full_attention", "sliding_attention"] * 2
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 5_000.0


# ---------------------------------------------------------------- config mapping (no weights)

# answerdotai/ModernBERT-base's config.json as published (written by transformers 4.47: 4.x fields only).
MODERNBERT_BASE_CONFIG = {
    "architectures": ["ModernBertForMaskedLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 50281, "classifier_activation": "gelu", "classifier_bias": False, "classifier_dropout": 0.0,
    "classifier_pooling": "mean", "cls_token_id": 50281, "decoder_bias": True, "deterministic_flash_attn": False,
    "embedding_dropout": 0.0, "eos_token_id": 50282, "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
    "gradient_checkpointing": False, "hidden_activation": "gelu", "hidden_size": 768,
    "initializer_cutoff_factor": 2.0, "initializer_range": 0.02, "intermediate_size": 1152, "layer_norm_eps": 1e-05,
    "local_attention": 128, "local_rope_theta": 10000.0, "max_position_embeddings": 8192, "mlp_bias": False,
    "mlp_dropout": 0.0, "model_type": "modernbert", "norm_bias": False, "norm_eps": 1e-05, "num_attention_heads": 12,
    "num_hidden_layers": 22, "pad_token_id": 50283, "position_embedding_type": "absolute", "reference_compile": True,
    "sep_token_id": 50282, "sparse_pred_ignore_index": -100, "sparse_prediction": False, "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0", "vocab_size": 50368,
}
# FacebookAI/xlm-roberta-base's config.json as published.
XLMR_BASE_CONFIG = {
    "architectures": ["XLMRobertaForMaskedLM"], "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 514,
    "model_type": "xlm-roberta", "num_attention_heads": 12, "num_hidden_layers": 12, "output_past": True,
    "pad_token_id": 1, "type_vocab_size": 1, "vocab_size": 250002,
}


@pytest.mark.parametrize("hf, preset", [(MODERNBERT_BASE_CONFIG, "modernbert-base"), (XLMR_BASE_CONFIG, "xlmr-base")])
def test_published_configs_are_our_presets(hf, preset):
    assert config_from_hf(hf) == dataclasses.replace(EncoderConfig.from_name(preset), preset=None)


@pytest.mark.parametrize("preset", ["bert-10m", "xlmr-base", "modernbert-base", "modernbert-hindi-33m"])
def test_config_round_trip_of_presets(preset):
    cfg = EncoderConfig.from_name(preset)
    assert config_from_hf(config_to_hf(cfg, pad_token_id=cfg.pad_token_id)) == dataclasses.replace(cfg, preset=None)


@pytest.mark.parametrize("hf, eps", [
    (dict(architectures=["BertForMaskedLM"]), 1e-12),
    (dict(architectures=["XLMRobertaForMaskedLM"]), 1e-12),  # the class default; published files say 1e-5
    (dict(model_type="roberta"), 1e-12),
    (dict(architectures=["ModernBertForMaskedLM"]), 1e-5),
])
def test_absent_fields_take_transformers_defaults(hf, eps):
    """A config.json may leave fields out; transformers then builds its class defaults, and so do we."""
    cfg = config_from_hf(dict(hf, vocab_size=VOCAB, pad_token_id=0))
    assert cfg.norm_eps == eps
    assert cfg.max_seq_len == {"bert": 512, "roberta": 511, "modernbert": 8192}[cfg.family]


def test_roberta_positions_follow_the_pad_id():
    cfg = EncoderConfig.from_name("xlmr-base")
    assert config_to_hf(cfg)["max_position_embeddings"] == 514  # 512 usable + pad_token_id + 1
    with pytest.raises(SlmforgeError, match=r"model.pad_token_id: 1, but the tokenizer pads with id 0"):
        config_to_hf(cfg, pad_token_id=0)


# ---------------------------------------------------------------- one-line refusals


@pytest.mark.parametrize("family, changes, message", [
    ("bert", dict(hidden_act="gelu_new"), r"hidden_act='gelu_new' is not supported"),
    ("bert", dict(position_embedding_type="relative_key"), r"position_embedding_type='relative_key'"),
    ("bert", dict(tie_word_embeddings=False), r"tie_word_embeddings=False is not supported"),
    ("bert", dict(attention_probs_dropout_prob=0.2), r"one dropout rate"),
    ("roberta", dict(is_decoder=True), r"is_decoder=True is not supported"),
    ("modernbert", dict(attention_bias=True), r"attention_bias=True is not supported"),
    ("modernbert", dict(norm_bias=True), r"norm_bias=True is not supported"),
    ("modernbert", dict(decoder_bias=False), r"decoder_bias=False is not supported"),
    ("modernbert", dict(hidden_activation="gelu_pytorch_tanh"), r"hidden_activation='gelu_pytorch_tanh'"),
    ("modernbert", dict(sliding_window=WINDOW), r"local_attention=8 and sliding_window=8 disagree"),
    ("modernbert", dict(layer_types=["sliding_attention", "full_attention"] * 2), r"layer_types and global_attn"),
    ("modernbert", dict(layer_types=["sliding_attention", "full_attention"] * 2, global_attn_every_n_layers=None),
     r"only 'layers 0, n, 2n, \.\.\. are global' patterns"),
    ("modernbert", dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"rope_type 'linear' is not supported"),
])
def test_unsupported_config_is_refused_in_one_line(tmp_path, family, changes, message):
    run, _ = make_run(tmp_path, OUR_CASES[family])
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(SlmforgeError, match=message) as caught:
        import_hf(out, tmp_path / "imported")
    assert "\n" not in str(caught.value) and str(out / "config.json") in str(caught.value)
    assert not (tmp_path / "imported").exists()


def test_unexportable_config_is_refused_in_one_line(tmp_path):
    cfg = dataclasses.replace(OUR_CASES["modernbert"], type_vocab_size=2)
    with pytest.raises(SlmforgeError, match=r"model.type_vocab_size: ModernBertForMaskedLM has no token-type"):
        config_to_hf(cfg)


@pytest.mark.parametrize("family, edit, message", [
    ("modernbert", lambda t: t.pop("model.layers.1.attn.Wqkv.weight"),
     r"missing tensor model\.layers\.1\.attn\.Wqkv\.weight"),
    ("modernbert", lambda t: t.update({"model.layers.2.mlp.Wi.weight": torch.zeros(48, 64)}),
     r"tensor model\.layers\.2\.mlp\.Wi\.weight has shape \(48, 64\), config\.json implies \(96, 64\)"),
    ("modernbert", lambda t: t.update({"model.layers.0.attn_norm.weight": torch.ones(64)}),
     r"unexpected tensor model\.layers\.0\.attn_norm\.weight"),
    ("bert", lambda t: t.pop("cls.predictions.bias"), r"missing tensor cls\.predictions\.bias"),
    ("roberta", lambda t: t.update({"roberta.embeddings.position_embeddings.weight": torch.zeros(64, 64)}),
     r"position_embeddings\.weight has shape \(64, 64\), config\.json implies \(66, 64\)"),
])
def test_bad_checkpoint_tensor_is_named_in_one_line(tmp_path, family, edit, message):
    run, _ = make_run(tmp_path, OUR_CASES[family])
    out = export_hf(run, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlmforgeError, match=message) as caught:
        import_hf(out, tmp_path / "imported")
    assert "\n" not in str(caught.value)


def test_tied_copies_pooler_and_tensorflow_names_are_accepted(tmp_path):
    """What published BERT checkpoints carry beyond a BertForMaskedLM: LayerNorm gamma/beta names, the
    tied decoder copies, the pooler and the next-sentence head. transformers drops or renames them too."""
    run, ours = make_run(tmp_path, OUR_CASES["bert"])
    out = export_hf(run, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    tensors["bert.embeddings.LayerNorm.gamma"] = tensors.pop("bert.embeddings.LayerNorm.weight")
    tensors["bert.embeddings.LayerNorm.beta"] = tensors.pop("bert.embeddings.LayerNorm.bias")
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].clone()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    tensors["bert.pooler.dense.weight"], tensors["bert.pooler.dense.bias"] = torch.zeros(64, 64), torch.zeros(64)
    tensors["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    again, _, _ = load_model(import_hf(out, tmp_path / "again"))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
