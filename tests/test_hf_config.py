"""Hugging Face config and weight-name mapping, import/export folders and their errors.

None of this needs `transformers`: the mapping works on config.json dicts and safetensors files
(parity against transformers itself is in test_hf_parity.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmforge import config as config_io
from slmforge.checkpoint.reading import load_model
from slmforge.checkpoint.writing import save_checkpoint
from slmforge.cli import main
from slmforge.errors import SlmforgeError
from slmforge.interop import export_hf, import_hf
from slmforge.models import DecoderConfig, build_model
from slmforge.models.hf.decoder import config_from_hf, config_to_hf, hf_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# google/gemma-3-270m's config.json as published (written by transformers 4.55).
GEMMA3_270M_CONFIG = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16",
    "transformers_version": "4.55.0.dev0", "use_bidirectional_attention": False, "use_cache": True,
    "vocab_size": 262144,
}

# google/gemma-3-4b-pt's config.json: the multimodal wrapper stores only non-default text fields.
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}

TINY = {
    "gemma3": DecoderConfig.from_name("gemma3-tiny", vocab_size=320, hidden_size=32, num_layers=4, num_heads=2,
                                    head_dim=16, intermediate_size=48, max_seq_len=64, sliding_window=8,
                                    global_every=2, query_pre_attn_scalar=16.0),
    "llama": DecoderConfig.from_name("test-tiny", vocab_size=320, tie_embeddings=False),
}


def strip_preset(cfg: DecoderConfig) -> DecoderConfig:
    return dataclasses.replace(cfg, preset=None)


def make_tokenizer_dir(path: Path) -> Path:
    """A tiny byte-level BPE tokenizer folder with <pad>=0, <eos>=1, <bos>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world"] * 10, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<bos>"}, "eos_token": "<eos>", "pad_token": "<pad>"}), encoding="utf-8")
    return path


def make_hf_dir(tmp_path: Path, family: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Export a random tiny model of `family` to a Hugging Face folder; returns (folder, model)."""
    model = build_model(TINY[family], seed=seed)
    save_checkpoint(tmp_path / f"run-{family}", 1, model)
    make_tokenizer_dir(tmp_path / f"run-{family}" / "tokenizer")
    return export_hf(tmp_path / f"run-{family}", tmp_path / f"hf-{family}"), model


def rewrite_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


# ---------------------------------------------------------------- config mapping


@pytest.mark.parametrize("preset", ["gemma3-270m", "gemma3-tiny", "llama-150m", "llama-tiny"])
def test_config_round_trip_of_presets(preset):
    cfg = DecoderConfig.from_name(preset)
    assert config_from_hf(config_to_hf(cfg)) == strip_preset(cfg)


@pytest.mark.parametrize("changes, equivalent", [
    (dict(family="llama", rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_seq_len=8192,
          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, tie_embeddings=False, head_dim=96), {}),
    (dict(family="llama", rope_scaling="linear", rope_scaling_factor=2.0), {}),
    (dict(preset="gemma3-tiny", rope_scaling="linear", rope_scaling_factor=8.0, final_logit_softcap=30.0), {}),
    (dict(preset="gemma3-tiny", sliding_window=None), dict(global_every=1)),  # every layer global
    (dict(preset="gemma3-tiny", global_every=100), dict(global_every=7)),  # no global layer among 6
])
def test_config_round_trip_of_variants(changes, equivalent):
    preset = changes.pop("preset", "llama-tiny")
    cfg = DecoderConfig.from_name(preset, **changes)
    assert config_from_hf(config_to_hf(cfg)) == dataclasses.replace(strip_preset(cfg), **equivalent)


def test_published_gemma3_270m_config_is_our_preset():
    assert config_from_hf(GEMMA3_270M_CONFIG) == strip_preset(DecoderConfig.from_name("gemma3-270m"))


def test_transformers5_rope_parameters_form_reads_the_same():
    legacy = dict(GEMMA3_270M_CONFIG, rope_scaling={"rope_type": "linear", "factor": 8.0})
    modern = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    modern["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    assert config_from_hf(legacy) == config_from_hf(modern)
    assert config_from_hf(modern).rope_scaling == "linear"
    assert config_from_hf(modern).rope_local_theta == 10_000.0


def test_sliding_window_pattern_without_layer_types():
    """transformers 4.50-4.52 configs carry only the integer pattern."""
    old = {k: v for k, v in GEMMA3_270M_CONFIG.items() if k not in ("layer_types", "_sliding_window_pattern")}
    old["sliding_window_pattern"] = 6
    assert config_from_hf(old) == config_from_hf(GEMMA3_270M_CONFIG)


def test_multimodal_gemma3_uses_the_text_config_with_transformers_defaults():
    cfg = config_from_hf(GEMMA3_4B_CONFIG)
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "gemma3", 2560, 34, 8, 4, 256)
    assert (cfg.vocab_size, cfg.sliding_window, cfg.global_every, cfg.query_pre_attn_scalar) == (262_208, 1024, 6, 256)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_theta, cfg.rope_local_theta) == (
        "linear", 8.0, 1_000_000.0, 10_000.0)
    assert cfg.tie_embeddings


IRREGULAR = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"] * 4 + [
    "full_attention", "full_attention"]


@pytest.mark.parametrize("layer_types", [IRREGULAR, ["full_attention", "sliding_attention"] * 9])
def test_any_gemma3_layer_types_list_is_kept(layer_types):
    """transformers accepts any per-layer list (e.g. sliding, full, sliding, sliding), so do we."""
    cfg = config_from_hf({**GEMMA3_270M_CONFIG, "layer_types": layer_types})
    assert cfg.layer_types == layer_types and cfg.sliding_window == 512
    assert [cfg.is_sliding(i) for i in range(18)] == [kind == "sliding_attention" for kind in layer_types]
    hf = config_to_hf(cfg)
    assert hf["layer_types"] == layer_types and hf["sliding_window"] == 512
    assert "sliding_window_pattern" not in hf  # 4.50-4.52 would read it as every 6th layer global
    assert config_from_hf(hf) == cfg


def test_regular_layer_types_still_become_global_every():
    """Existing configs and checkpoints keep meaning the same: an every-n-th pattern stays global_every."""
    cfg = config_from_hf(GEMMA3_270M_CONFIG)
    assert cfg.layer_types is None and cfg.global_every == 6
    assert config_to_hf(cfg)["sliding_window_pattern"] == 6


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types=["sliding_attention"] * 5), "model.layer_types: needs one entry per layer (6), got 5"),
    (dict(layer_types=["full_attention", "sliding_attention"] * 3, sliding_window=None),
     "model.layer_types: has sliding_attention layers but sliding_window is unset"),
    (dict(layer_types=["local"] * 6), "model.layer_types[0]: must be one of"),
])
def test_layer_types_config_errors(changes, message):
    from slmforge.errors import ConfigError

    with pytest.raises(ConfigError) as excinfo:
        DecoderConfig.from_name("gemma3-tiny", **changes)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_exported_config_carries_both_rope_forms():
    cfg = DecoderConfig.from_name("gemma3-tiny", rope_scaling="linear", rope_scaling_factor=4.0)
    hf = config_to_hf(cfg, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    assert hf["architectures"] == ["Gemma3ForCausalLM"] and hf["model_type"] == "gemma3_text"
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert hf["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    assert hf["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    assert hf["rope_local_base_freq"] == 1e4 and hf["sliding_window_pattern"] == 6
    assert hf["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"])
    assert isinstance(hf["query_pre_attn_scalar"], int)  # transformers 5 rejects 32.0


# ---------------------------------------------------------------- weight names


def test_weight_names_per_family():
    gemma = build_model(DecoderConfig.from_name("gemma3-tiny", num_layers=1), device="meta", seed=None)
    assert sorted(hf_name(gemma.cfg, n) for n in gemma.state_dict()) == sorted([
        "model.embed_tokens.weight", "model.norm.weight",
        *(f"model.layers.0.{n}.weight" for n in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
            "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))])
    llama = build_model(DecoderConfig.from_name("llama-tiny", num_layers=1, tie_embeddings=False), device="meta",
                        seed=None)
    assert sorted(hf_name(llama.cfg, n) for n in llama.state_dict()) == sorted([
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        *(f"model.layers.0.{n}.weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))])


# ---------------------------------------------------------------- RoPE tables as transformers builds them


def test_rope_frequencies_are_float32_like_transformers():
    """transformers (and Meta's / Google's reference code) compute 1 / theta^(2i/d) in float32."""
    cfg = DecoderConfig.from_name("gemma3-270m", num_layers=1, vocab_size=8)
    model = build_model(cfg, seed=None)
    for theta, table in ((1_000_000.0, model.inv_freq_global), (10_000.0, model.inv_freq_local)):
        expected = 1.0 / (theta ** (torch.arange(0, 256, 2, dtype=torch.int64).float() / 256))
        assert torch.equal(table, expected)


def test_rope_tables_stay_float32_in_a_bf16_model():
    model = build_model(DecoderConfig.from_name("test-tiny"), seed=0)
    before = model.inv_freq_global.clone()
    model = model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.inv_freq_global.dtype == model.inv_freq_local.dtype == torch.float32
    assert torch.equal(model.inv_freq_global, before)
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16


# ---------------------------------------------------------------- folders


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_export_then_import_round_trips_weights_and_writes_a_run(tmp_path, family):
    hf_dir, model = make_hf_dir(tmp_path, family)
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tensors = load_file(hf_dir / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not model.cfg.tie_embeddings)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)

    run = import_hf(hf_dir, tmp_path / "imported")
    again, step_dir, meta = load_model(run)
    assert step_dir.name == "step-000000"
    assert meta["imported_from"]["architecture"] == config["architectures"][0]
    assert again.cfg == strip_preset(model.cfg)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    written = tomllib.loads((run / "config.toml").read_text())
    assert config_io.from_dict(DecoderConfig, written["model"], "model") == again.cfg


def test_sharded_checkpoint_imports(tmp_path):
    hf_dir, model = make_hf_dir(tmp_path, "llama")
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, hf_dir / shard, metadata={"format": "pt"})
    (hf_dir / "model.safetensors").unlink()
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    again, _, _ = load_model(import_hf(hf_dir, tmp_path / "run"))
    assert torch.equal(again.embed.weight, model.embed.weight)


def test_pytorch_bin_checkpoint_imports(tmp_path):
    hf_dir, model = make_hf_dir(tmp_path, "gemma3")
    torch.save(load_file(hf_dir / "model.safetensors"), hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    again, _, _ = load_model(import_hf(hf_dir, tmp_path / "run"))
    assert torch.equal(again.layers[1].attn.q_norm.weight, model.layers[1].attn.q_norm.weight)


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_multimodal_checkpoint_imports_its_text_part(tmp_path, layout):
    hf_dir, model = make_hf_dir(tmp_path, "gemma3")
    text = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model"}}))
    prefix = "language_model.model." if layout == "transformers4" else "model.language_model."
    vision = "vision_tower." if layout == "transformers4" else "model.vision_tower."
    tensors = {prefix + n[len("model."):]: t for n, t in load_file(hf_dir / "model.safetensors").items()}
    tensors[vision + "vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(4, 32)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    again, _, meta = load_model(import_hf(hf_dir, tmp_path / "run"))
    assert meta["imported_from"]["architecture"] == "Gemma3ForConditionalGeneration"
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- errors: one line naming the culprit


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture_is_named(tmp_path, capsys):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2}
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(SlmforgeError) as excinfo:
        import_hf(tmp_path / "gpt2", tmp_path / "run")
    assert "GPT2LMHeadModel" in one_line_error(excinfo)
    assert main(["import-hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmforge: error:") and "GPT2LMHeadModel" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, named", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_activation="relu"), "hidden_activation"),
    (dict(layer_types=["sliding_attention"] * 17 + ["full_attention"] * 2), "layer_types"),  # 19 for 18 layers
    (dict(layer_types=["chunked_attention"] * 18), "layer_types"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(num_key_value_heads=3), "num_kv_heads"),
    (dict(sliding_window=None), "sliding_window"),
])
def test_unsupported_config_fields_are_named(changes, named):
    with pytest.raises(SlmforgeError) as excinfo:
        config_from_hf({**GEMMA3_270M_CONFIG, **changes})
    assert named in one_line_error(excinfo)


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf_dir, _ = make_hf_dir(tmp_path, "llama")
    rewrite_config(hf_dir, intermediate_size=80)
    with pytest.raises(SlmforgeError) as excinfo:
        import_hf(hf_dir, tmp_path / "run")
    message = one_line_error(excinfo)
    assert "model.layers.0.mlp.gate_proj.weight" in message and "(64, 32)" in message and "(80, 32)" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("edit, named", [
    ("drop", "model.layers.1.self_attn.k_proj.weight"),
    ("extra", "model.layers.0.self_attn.q_proj.bias"),
])
def test_missing_or_unexpected_tensor_is_named(tmp_path, edit, named):
    hf_dir, _ = make_hf_dir(tmp_path, "llama")
    tensors = load_file(hf_dir / "model.safetensors")
    if edit == "drop":
        del tensors[named]
    else:
        tensors[named] = torch.zeros(32)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlmforgeError) as excinfo:
        import_hf(hf_dir, tmp_path / "run")
    assert named in one_line_error(excinfo)


def test_import_needs_a_fast_tokenizer(tmp_path):
    hf_dir, _ = make_hf_dir(tmp_path, "llama")
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(SlmforgeError, match="tokenizer.json"):
        import_hf(hf_dir, tmp_path / "run")


def test_outputs_are_not_overwritten_without_force(tmp_path):
    hf_dir, _ = make_hf_dir(tmp_path, "llama")
    with pytest.raises(SlmforgeError, match="--force"):
        export_hf(tmp_path / "run-llama", hf_dir)
    export_hf(tmp_path / "run-llama", hf_dir, force=True)
    import_hf(hf_dir, tmp_path / "run")
    with pytest.raises(SlmforgeError, match="--force"):
        import_hf(hf_dir, tmp_path / "run")


@pytest.mark.parametrize("changes, named", [
    (dict(family="llama", qk_norm=True), "model.qk_norm"),
    (dict(family="llama", sliding_window=16, global_every=2), "model.sliding_window"),
    (dict(family="llama", final_logit_softcap=30.0), "model.final_logit_softcap"),
    (dict(family="gemma3", activation="gelu_tanh"), "model.qk_norm"),
    (dict(preset="gemma3-tiny", query_pre_attn_scalar=20.5), "model.query_pre_attn_scalar"),
])
def test_export_rejects_what_the_architecture_cannot_express(tmp_path, capsys, changes, named):
    cfg = DecoderConfig.from_name(changes.pop("preset", "test-tiny"), **changes)
    save_checkpoint(tmp_path / "run", 1, build_model(cfg, seed=0))
    make_tokenizer_dir(tmp_path / "run" / "tokenizer")
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_cli_export_and_import(tmp_path, capsys):
    save_checkpoint(tmp_path / "run", 3, build_model(TINY["gemma3"], seed=0))
    make_tokenizer_dir(tmp_path / "run" / "tokenizer")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "train.init_from=" in capsys.readouterr().out
    assert (tmp_path / "back" / "checkpoints" / "latest").is_file()
