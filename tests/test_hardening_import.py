"""`slmforge import-hf` with a bad config.json: every field is type-checked against the field of ours it
fills, layer counts and the model's size are checked before anything loops, builds or allocates, and the
checkpoint's tensor shapes are compared with the config before the model's memory is taken. Each refusal
is one SlmforgeError line naming config.json, the field and its value.

Tiny and fast: config.json dicts go straight through `config_from_hf`; the few folder tests write a
tiny checkpoint by hand (no training, no transformers).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slmforge.cli import main
from slmforge.errors import SlmforgeError
from slmforge.interop import import_hf
from slmforge.models import DecoderConfig, EncDecConfig, EncoderConfig, build_model
from slmforge.models.hf import config_from_hf, config_to_hf, state_dict_to_hf

WHERE = "some/model/config.json"
# The module (slmforge.interop's `import_hf` attribute is the function of the same name).
IMPORT_MODULE = importlib.import_module("slmforge.interop.import_hf")

TINY = {
    "llama": DecoderConfig.from_name("test-tiny", vocab_size=64, tie_embeddings=False),
    "gemma3": DecoderConfig.from_name("gemma3-tiny", vocab_size=64, hidden_size=32, num_layers=4, num_heads=2,
                                      head_dim=16, intermediate_size=48, max_seq_len=64, sliding_window=8,
                                      global_every=2, query_pre_attn_scalar=16.0),
    "bert": EncoderConfig.from_name("bert-tiny", vocab_size=64, max_seq_len=32, pad_token_id=0),
    "roberta": EncoderConfig.from_name("roberta-tiny", vocab_size=64, max_seq_len=32, pad_token_id=1),
    "modernbert": EncoderConfig.from_name("modernbert-tiny", vocab_size=64, num_layers=4, local_window=8,
                                          intermediate_size=48, pad_token_id=0),
    "t5": EncDecConfig.from_name("t5-tiny", vocab_size=64),
}
LAYERS_FIELD = {"llama": "num_hidden_layers", "gemma3": "num_hidden_layers", "bert": "num_hidden_layers",
                "roberta": "num_hidden_layers", "modernbert": "num_hidden_layers", "t5": "num_layers"}
FFN_FIELD = {family: "intermediate_size" for family in LAYERS_FIELD} | {"t5": "d_ff"}


def hf_config(family: str, **changes) -> dict:
    """config.json of the tiny model of `family`, as export writes it, with `changes`."""
    return {**config_to_hf(TINY[family]), **changes}


def refused(hf: dict) -> str:
    with pytest.raises(SlmforgeError) as caught:
        config_from_hf(hf, where=WHERE)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(WHERE), message
    return message


def write_hf_dir(path: Path, family: str, **changes) -> Path:
    """A tiny Hugging Face folder of `family`; `changes` edit its config.json after the weights are written."""
    cfg = TINY[family]
    path.mkdir(parents=True)
    save_file(state_dict_to_hf(cfg, build_model(cfg, seed=0).state_dict()), path / "model.safetensors",
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(family, **changes)), encoding="utf-8")
    (path / "tokenizer.json").write_text("{}", encoding="utf-8")  # refusals come before the tokenizer is read
    return path


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("family, field, value", [
    ("llama", "hidden_size", "128"),
    ("llama", "num_attention_heads", 2.5),
    ("llama", "rms_norm_eps", "abc"),
    ("llama", "tie_word_embeddings", "false"),
    ("llama", "max_position_embeddings", [64]),
    ("gemma3", "rms_norm_eps", "abc"),
    ("gemma3", "query_pre_attn_scalar", "16"),
    ("gemma3", "sliding_window", "8"),
    ("bert", "hidden_size", "128"),
    ("bert", "layer_norm_eps", "abc"),
    ("roberta", "pad_token_id", "1"),
    ("roberta", "vocab_size", 64.5),
    ("modernbert", "norm_eps", "abc"),
    ("modernbert", "local_attention", "8"),
    ("modernbert", "global_rope_theta", "big"),
    ("t5", "d_model", "128"),
    ("t5", "layer_norm_epsilon", "abc"),
    ("t5", "feed_forward_proj", ["gated-gelu"]),
    ("t5", "decoder_start_token_id", "0"),
])
def test_a_field_of_the_wrong_type_is_named_with_its_value(family, field, value):
    message = refused(hf_config(family, **{field: value}))
    assert field in message and repr(value) in message


@pytest.mark.parametrize("family, rope, named", [
    ("llama", {"rope_type": "linear", "factor": "2"}, "factor"),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": "8192"}, "original_max_position_embeddings"),
    ("llama", {"rope_type": "linear"}, "factor"),
    ("gemma3", {"rope_type": "linear", "factor": "2"}, "factor"),
])
def test_a_bad_rope_scaling_table_is_named(family, rope, named):
    message = refused(hf_config(family, rope_scaling=rope, rope_parameters=None))
    assert "rope" in message and named in message


def test_text_config_and_architectures_of_the_wrong_type_are_named():
    assert "text_config" in refused({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": "abc"})
    assert "architectures" in refused({**hf_config("llama"), "architectures": 7})


def test_an_imported_config_toml_holds_only_values_of_the_right_type():
    """Before, `rms_norm_eps: "abc"` was written into config.toml and only refused by generate/finetune."""
    message = refused(hf_config("gemma3", rms_norm_eps="abc"))
    assert "rms_norm_eps" in message and "'abc'" in message


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("family", sorted(TINY))
def test_an_implausible_layer_count_is_refused_at_once(family):
    field = LAYERS_FIELD[family]
    hf = hf_config(family, **{field: 1e9})
    hf.pop("layer_types", None)  # Gemma 3 and ModernBERT: the pattern fields alone would loop over the layers
    start = time.perf_counter()
    message = refused(hf)
    assert time.perf_counter() - start < 1.0
    assert field in message and "1000000000" in message


@pytest.mark.parametrize("family", sorted(TINY))
def test_a_model_too_large_to_import_is_refused_with_its_size(family):
    field = FFN_FIELD[family]
    message = refused(hf_config(family, **{field: 1e9}))
    assert f"{field}=1000000000" in message and "billion parameters" in message and "GiB" in message


def test_a_3b_config_is_within_the_size_limit():
    """meta-llama/Llama-3.2-3B's shapes import; ten times its layers do not."""
    llama_3b = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
                "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    cfg = config_from_hf(llama_3b, where=WHERE)
    assert 3.0e9 < cfg.num_parameters() < 3.5e9
    message = refused({**llama_3b, "num_hidden_layers": 280})
    assert "num_hidden_layers=280" in message and "billion parameters" in message


# ---------------------------------------------------------------- folders: one line, nothing built


def test_cli_import_of_a_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys):
    hf_dir = write_hf_dir(tmp_path / "hf", "llama", hidden_size="128")
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(hf_dir / "config.json") in err and "hidden_size" in err and "'128'" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_checkpoint_shapes_are_compared_before_the_model_is_allocated(tmp_path, monkeypatch):
    hf_dir = write_hf_dir(tmp_path / "hf", "llama", intermediate_size=80)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before its shapes were checked")

    monkeypatch.setattr(IMPORT_MODULE, "build_model", no_allocation)
    with pytest.raises(SlmforgeError, match=r"config\.json implies \(80, 32\)"):
        import_hf(hf_dir, tmp_path / "run")


def test_a_model_larger_than_the_memory_available_is_refused_before_allocating(tmp_path, monkeypatch):
    hf_dir = write_hf_dir(tmp_path / "hf", "bert")
    monkeypatch.setattr(IMPORT_MODULE, "available_memory", lambda: 1000)  # bytes
    with pytest.raises(SlmforgeError) as caught:
        import_hf(hf_dir, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message and str(hf_dir / "config.json") in message
    assert "hidden_size=" in message and "GiB" in message and "memory available" in message
    assert not (tmp_path / "run").exists()
