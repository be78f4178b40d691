"""Hugging Face names of the decoder families (see `models/hf/__init__.py` for the adapter interface).

Four families map onto `DecoderConfig`:

    family   transformers class                      config.json model_type
    gemma3   Gemma3ForCausalLM                       gemma3_text
             Gemma3ForConditionalGeneration (text)   gemma3 (the text_config part; vision weights skipped)
    llama    LlamaForCausalLM                        llama
    qwen3    Qwen3ForCausalLM                        qwen3
    smollm3  SmolLM3ForCausalLM                      smollm3

Each family's facts are rows of the tables below (ARCHITECTURES, MODEL_TYPES, HF_DEFAULTS,
_LAYER_MODULES, _FAMILY_SWITCHES, _EXTRAS); Llama, Qwen3 and SmolLM3 share the Llama code paths.

Everything here works on plain dicts and tensors (config.json, safetensors), so export and import
need no `transformers`. Config files are written so that transformers 4.5x (rope_theta / rope_scaling /
rope_local_base_freq / sliding_window_pattern) and 5.x (rope_parameters / layer_types) both read them
the same way, and both forms are read back (a Gemma 3 layer pattern other than "every n-th layer
global" exists only as layer_types, which 4.53+ reads).

Weight names (ours -> transformers):

    embed.weight                        model.embed_tokens.weight
    layers.{i}.attn_norm.weight         model.layers.{i}.input_layernorm.weight
    layers.{i}.attn_out_norm.weight     model.layers.{i}.post_attention_layernorm.weight    (gemma3)
    layers.{i}.mlp_norm.weight          model.layers.{i}.pre_feedforward_layernorm.weight   (gemma3)
                                        model.layers.{i}.post_attention_layernorm.weight    (the others)
    layers.{i}.mlp_out_norm.weight      model.layers.{i}.post_feedforward_layernorm.weight  (gemma3)
    layers.{i}.attn.{q,k,v,o}_proj      model.layers.{i}.self_attn.{q,k,v,o}_proj           (.bias: attention_bias)
    layers.{i}.attn.{q,k}_norm          model.layers.{i}.self_attn.{q,k}_norm               (gemma3, qwen3)
    layers.{i}.mlp.{gate,up,down}_proj  model.layers.{i}.mlp.{gate,up,down}_proj
    norm.weight                         model.norm.weight
    lm_head.weight                      lm_head.weight                                      (untied only)
"""

from __future__ import annotations

from typing import Any

import torch

from slmforge.errors import SlmforgeError
from slmforge.models.hf.reader import ConfigReader, checked_config, hf_types, typed
from slmforge.models.decoder_config import DecoderConfig

ARCHITECTURES = {"gemma3": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM"}
MODEL_TYPES = {"gemma3": "gemma3_text", "llama": "llama", "qwen3": "qwen3", "smollm3": "smollm3"}
MULTIMODAL_GEMMA3 = "Gemma3ForConditionalGeneration"
SUPPORTED = ("Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its text part), LlamaForCausalLM, "
             "Qwen3ForCausalLM, SmolLM3ForCausalLM, "
             "BertForMaskedLM, XLMRobertaForMaskedLM, RobertaForMaskedLM and ModernBertForMaskedLM")

# transformers' own defaults for fields a config.json may leave out (Gemma3TextConfig, LlamaConfig, ...).
# They matter: multimodal Gemma 3 checkpoints store only the text_config fields that differ from these.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3": dict(
        vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=True,
        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
    ),
    "llama": dict(
        vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10_000.0,
    ),
    "qwen3": dict(
        vocab_size=151_936, hidden_size=4096, intermediate_size=22_016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
        max_position_embeddings=32_768, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10_000.0,
    ),
    "smollm3": dict(
        vocab_size=128_256, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32_768,
        initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=2_000_000.0,
        no_rope_layer_interval=4,
    ),
}

# Activation names transformers uses for the tanh-approximated GELU (numerically the same function).
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
_SILU = ("silu", "swish")

# Our per-layer module names -> transformers' names, by family.
_LAYER_MODULES = {
    "llama": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
              "attn": "self_attn", "mlp": "mlp"},
    "gemma3": {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm",
               "attn": "self_attn", "mlp": "mlp"},
}
_LAYER_MODULES["qwen3"] = _LAYER_MODULES["smollm3"] = _LAYER_MODULES["llama"]

# The block switches each transformers class hard-codes.
_FAMILY_SWITCHES = {
    "gemma3": dict(qk_norm=True, sandwich_norm=True, norm_unit_offset=True, embed_scale=True,
                   activation="gelu_tanh"),
    "llama": dict(qk_norm=False, sandwich_norm=False, norm_unit_offset=False, embed_scale=False,
                  activation="silu"),
    "qwen3": dict(qk_norm=True, sandwich_norm=False, norm_unit_offset=False, embed_scale=False,
                  activation="silu"),
    "smollm3": dict(qk_norm=False, sandwich_norm=False, norm_unit_offset=False, embed_scale=False,
                    activation="silu"),
}

# The classes built like LlamaForCausalLM (one RoPE base, no sliding window, no soft-capping), each with
# the config.json fields it writes besides the shared ones.
_LLAMA_LIKE = {"llama": dict(mlp_bias=False, pretraining_tp=1),
               "qwen3": dict(use_sliding_window=False, sliding_window=None),
               "smollm3": dict(mlp_bias=False, use_sliding_window=False, sliding_window=None)}

# What else a class can express: attention_bias (biases on q, k, v and o together), layers without RoPE
# (SmolLM3's no_rope_layers).
_EXTRAS = {"gemma3": set(), "llama": {"attention_bias"}, "qwen3": {"attention_bias"},
           "smollm3": {"attention_bias", "nope"}}


# ---------------------------------------------------------------- DecoderConfig -> config.json


def check_exportable(cfg: DecoderConfig) -> None:
    """Raise a SlmforgeError naming the first field transformers' class for this family cannot express."""
    if cfg.family not in ARCHITECTURES:
        raise SlmforgeError(f"model.family: {cfg.family!r} has no Hugging Face mapping; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    arch, extras = ARCHITECTURES[cfg.family], _EXTRAS[cfg.family]
    for name, wanted in _FAMILY_SWITCHES[cfg.family].items():
        if getattr(cfg, name) != wanted:
            raise SlmforgeError(f"model.{name}: {arch} requires {wanted!r}, this model has {getattr(cfg, name)!r}")
    if "attention_bias" not in extras and (cfg.qkv_bias or cfg.out_bias):
        raise SlmforgeError(f"model.qkv_bias: slmforge exports {arch} without attention biases")
    if cfg.qkv_bias != cfg.out_bias:
        raise SlmforgeError(f"model.out_bias: {arch}'s attention_bias puts biases on q, k, v and o alike; "
                            f"this model has qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}")
    nope = [i for i in range(cfg.num_layers) if not cfg.uses_rope(i)]
    if nope and "nope" not in extras:
        raise SlmforgeError(f"model.nope_every: {arch} applies RoPE on every layer (layers {nope[:3]}... have none)")
    if cfg.family in _LLAMA_LIKE:
        sliding = [i for i in range(cfg.num_layers) if cfg.is_sliding(i)]
        if sliding:
            raise SlmforgeError(f"model.sliding_window: {arch} has no sliding-window attention "
                                f"(layers {sliding[:3]}... are sliding)")
        if cfg.query_pre_attn_scalar not in (None, float(cfg.head_dim)):
            raise SlmforgeError(f"model.query_pre_attn_scalar: {arch} scales attention by head_dim ** -0.5; "
                                f"this model uses {cfg.query_pre_attn_scalar}")
        if cfg.final_logit_softcap is not None:
            raise SlmforgeError(f"model.final_logit_softcap: {arch} has no logit soft-capping")


def _rope_scaling_dict(cfg: DecoderConfig) -> dict[str, Any] | None:
    """transformers' rope_scaling dict for our scaling settings (None = plain RoPE)."""
    if cfg.rope_scaling == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
        scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return scaling


def config_to_hf(cfg: DecoderConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json contents for `cfg`, readable by transformers 4.5x and 5.x alike."""
    check_exportable(cfg)
    scaling = _rope_scaling_dict(cfg)
    full_rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})}
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": MODEL_TYPES[cfg.family],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        # 4.x reads torch_dtype, 5.x reads dtype (and accepts torch_dtype silently).
        "torch_dtype": dtype,
        "dtype": dtype,
        # 4.x: RoPE settings as top-level fields. 5.x prefers rope_parameters; when both are present
        # it merges rope_scaling into them, so the two forms must (and do) say the same thing.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
    }
    if cfg.family in _LLAMA_LIKE:
        hf.update(hidden_act="silu", rope_parameters=full_rope, **_LLAMA_LIKE[cfg.family])
        if "nope" in _EXTRAS[cfg.family]:  # 1 = RoPE, 0 = none
            hf["no_rope_layers"] = [int(cfg.uses_rope(i)) for i in range(cfg.num_layers)]
            if cfg.nope_every and cfg.nope_layers is None:
                hf["no_rope_layer_interval"] = cfg.nope_every
        return hf
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    layer_types = ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_layers)]
    has_sliding = "sliding_attention" in layer_types
    hf.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=_whole(cfg.query_pre_attn_scalar or cfg.head_dim, "query_pre_attn_scalar"),
        # transformers builds a sliding mask even when no layer uses it, so the field must hold a number;
        # a window as long as the context is the same as none.
        sliding_window=cfg.sliding_window if has_sliding else cfg.max_seq_len,
        layer_types=layer_types,
        rope_local_base_freq=local_theta,
        # Gemma 3 scales RoPE on global layers only; local layers keep plain RoPE with their own base.
        rope_parameters={"full_attention": full_rope,
                         "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        final_logit_softcapping=cfg.final_logit_softcap,
        attn_logit_softcapping=None,
        use_bidirectional_attention=False,
    )
    # 4.50-4.52 know only the integer pattern: layer i is global iff (i + 1) % pattern == 0. Other
    # per-layer lists have none (those versions would assume 6, so they need transformers >= 4.53).
    pattern = _every_nth_global(layer_types)
    if pattern is not None:
        hf["sliding_window_pattern"] = pattern if has_sliding else 1
    return hf


def _every_nth_global(layer_types: list[str]) -> int | None:
    """n when layer i is global iff (i + 1) % n == 0 (no global layer: n = layers + 1), else None."""
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    every = full[0] + 1 if full else len(layer_types) + 1
    expected = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(len(layer_types))]
    return every if layer_types == expected else None


def _whole(value: float, name: str) -> int:
    """transformers 5 types some fields as int and rejects 256.0."""
    if float(value) != int(value):
        raise SlmforgeError(f"model.{name}: transformers needs a whole number, this model has {value}")
    return int(value)


# ---------------------------------------------------------------- config.json -> DecoderConfig


def text_config(hf: dict[str, Any], where: str = "config.json") -> tuple[str, dict[str, Any], bool]:
    """(family, the text model's config dict, is_multimodal_wrapper) for a config.json dict.

    Raises a SlmforgeError naming the architecture when it is not one we map.
    """
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    model_type = hf.get("model_type")
    if arch == MULTIMODAL_GEMMA3 or (arch is None and model_type == "gemma3"):
        text = dict(typed(where, "text_config", hf.get("text_config"), dict[str, Any]) or {})
        # Multimodal configs store only the text fields that differ from Gemma3TextConfig's defaults.
        text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
        return "gemma3", text, True
    for family, name in ARCHITECTURES.items():
        if arch == name or (arch is None and model_type == MODEL_TYPES[family]):
            return family, hf, False
    shown = arch or "(none)"
    raise SlmforgeError(f"{where}: architecture {shown} (model_type {model_type!r}) is not supported; "
                        f"slmforge imports {SUPPORTED}")


def is_multimodal(hf: dict[str, Any]) -> bool:
    return text_config(hf)[2]


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    """The `DecoderConfig` equivalent to a transformers config.json dict (4.5x or 5.x form)."""
    family, text, _ = text_config(hf, where)
    if family == "gemma3":
        where = f"{where} text_config" if text is not hf else where
    get = ConfigReader(text, HF_DEFAULTS[family], where, _HF_TYPES, layer_fields=("num_hidden_layers",))
    if "attention_bias" not in _EXTRAS[family]:
        get.reject_truthy("attention_bias", "attention biases are not supported")
    get.reject_truthy("mlp_bias", "MLP biases are not supported")
    get.reject_truthy("use_sliding_window", "sliding windows are supported for Gemma 3 only")
    get.reject_truthy("attn_logit_softcapping", "attention logit soft-capping is not supported")
    get.reject_truthy("use_bidirectional_attention", "bidirectional attention (EmbeddingGemma) is not supported")
    partial = get.optional("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise SlmforgeError(f"{where}: partial_rotary_factor={partial} is not supported "
                            f"(slmforge rotates the whole head)")
    num_heads = get("num_attention_heads")
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=get.optional("num_key_value_heads") or num_heads,
        head_dim=get.optional("head_dim") or None,  # None: hidden_size // num_heads (DecoderConfig)
        max_seq_len=get("max_position_embeddings"),
        norm_eps=get("rms_norm_eps"),
        init_std=get("initializer_range"),
        tie_embeddings=bool(get("tie_word_embeddings")),
    )
    if family in _LLAMA_LIKE:
        act = get("hidden_act")
        if act not in _SILU:
            raise SlmforgeError(f"{where}: hidden_act={act!r} is not supported; {ARCHITECTURES[family]} in "
                                f"slmforge is SwiGLU (silu)")
        if any(kind != "full_attention" for kind in get.optional("layer_types") or []):
            raise SlmforgeError(f"{where}: layer_types: only full_attention layers are supported")
        bias = bool(get.optional("attention_bias"))
        fields.update(_FAMILY_SWITCHES[family], qkv_bias=bias, out_bias=bias)
        if "nope" in _EXTRAS[family]:
            fields.update(_nope_layers(get, fields["num_layers"], where))
        # transformers 5: rope_scaling, when present, replaces rope_parameters; rope_theta fills the gaps.
        rope = dict(get.optional("rope_scaling") or get.optional("rope_parameters") or {})
        if rope.get("rope_theta") is None:
            rope["rope_theta"] = get("rope_theta")
        rope.setdefault("original_max_position_embeddings", fields["max_seq_len"])
        fields.update(rope_theta=_rope_number(rope, "rope_theta", f"{where}: rope_parameters"),
                      **_rope_scaling_fields(rope, f"{where}: rope_parameters"))
    else:
        act = get.optional("hidden_activation") or get.optional("hidden_act") or "gelu_pytorch_tanh"
        if act not in _GELU_TANH:
            raise SlmforgeError(f"{where}: hidden_activation={act!r} is not supported; "
                                f"Gemma 3 uses gelu_pytorch_tanh")
        fields.update(_FAMILY_SWITCHES["gemma3"])
        fields.update(query_pre_attn_scalar=get("query_pre_attn_scalar"),
                      final_logit_softcap=get.optional("final_logit_softcapping"))
        fields.update(_gemma3_layers(get, fields["num_layers"], where))
        fields.update(_gemma3_rope(get, fields["max_seq_len"], where))
    return checked_config(DecoderConfig(**fields), where, _HF_FIELD_NAMES)


# For error messages and type checks: our field -> the config.json field it came from.
_HF_FIELD_NAMES = dict(vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
                       num_heads="num_attention_heads", num_kv_heads="num_key_value_heads", head_dim="head_dim",
                       intermediate_size="intermediate_size", max_seq_len="max_position_embeddings",
                       sliding_window="sliding_window", rope_scaling_factor="rope_scaling.factor",
                       norm_eps="rms_norm_eps", init_std="initializer_range", tie_embeddings="tie_word_embeddings",
                       query_pre_attn_scalar="query_pre_attn_scalar", final_logit_softcap="final_logit_softcapping",
                       rope_theta="rope_theta", rope_local_theta="rope_local_base_freq",
                       qkv_bias="attention_bias", out_bias="attention_bias", nope_layers="no_rope_layers",
                       nope_every="no_rope_layer_interval")
# Every config.json field the reader takes: the type of our field it fills, or its own.
_HF_TYPES = hf_types(DecoderConfig, _HF_FIELD_NAMES, hidden_act=str, hidden_activation=str,
                     layer_types=list[str], sliding_window_pattern=int, _sliding_window_pattern=int,
                     rope_scaling=dict[str, Any], rope_parameters=dict[str, Any])


def _nope_layers(get: ConfigReader, num_layers: int, where: str) -> dict[str, Any]:
    """nope_every / nope_layers from SmolLM3's no_rope_layers (1 = RoPE, 0 = none; at least one entry per
    layer) or, without it, its no_rope_layer_interval (every n-th layer has none)."""
    flags = get.optional("no_rope_layers")
    if flags is None:
        every = get("no_rope_layer_interval")
        flags = [int((i + 1) % every != 0) for i in range(num_layers)] if every > 0 else [1] * num_layers
    if len(flags) < num_layers or any(flag not in (0, 1) for flag in flags):
        raise SlmforgeError(f"{where}: no_rope_layers needs a 0 or 1 for each of the {num_layers} layers")
    nope = [i for i in range(num_layers) if not flags[i]]
    every = nope[0] + 1 if nope else 0
    if not nope or nope == list(range(every - 1, num_layers, every)):  # every n-th layer (or none)
        return dict(nope_every=every)
    return dict(nope_every=0, nope_layers=nope)


def _gemma3_layers(get: ConfigReader, num_layers: int, where: str) -> dict[str, Any]:
    """sliding_window / global_every from layer_types (5.x, 4.53+) or sliding_window_pattern (4.50+);
    a layer_types list that is not "every n-th layer global" becomes our layer_types as it is."""
    layer_types = get.optional("layer_types")
    if layer_types is None:
        pattern = get.present("sliding_window_pattern") or get.present("_sliding_window_pattern") \
            or get.defaults["sliding_window_pattern"]
        if pattern < 1:
            raise SlmforgeError(f"{where}: sliding_window_pattern={pattern}: must be at least 1 "
                                f"(every n-th layer is global)")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise SlmforgeError(f"{where}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise SlmforgeError(f"{where}: layer_types: {unknown[0]!r} is not supported")
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if len(full) == num_layers:
        return dict(sliding_window=None, global_every=1)
    window = get("sliding_window")
    every = _every_nth_global(layer_types)
    if every is not None:
        return dict(sliding_window=window, global_every=every)
    # Any other per-layer list (transformers accepts every one): kept as it is.
    return dict(sliding_window=window, global_every=1, layer_types=list(layer_types))


def _gemma3_rope(get: ConfigReader, max_seq_len: int, where: str) -> dict[str, Any]:
    """Per-layer-type RoPE, resolved as transformers 5 does (rope_scaling merges into full_attention)."""
    params = get.optional("rope_parameters") or {}
    full = dict(typed(where, "rope_parameters.full_attention", params.get("full_attention"), dict[str, Any]) or {})
    local = dict(typed(where, "rope_parameters.sliding_attention", params.get("sliding_attention"),
                       dict[str, Any]) or {})
    full.update(get.optional("rope_scaling") or {})
    if full.get("rope_theta") is None:
        full["rope_theta"] = get("rope_theta")
    full.setdefault("original_max_position_embeddings", max_seq_len)
    if local.get("rope_theta") is None:
        local["rope_theta"] = get("rope_local_base_freq")
    if _rope_type(local, f"{where}: rope_parameters.sliding_attention") != "default":
        raise SlmforgeError(f"{where}: rope_parameters.sliding_attention: scaled RoPE on local layers "
                            f"is not supported (Gemma 3 scales global layers only)")
    return dict(rope_theta=_rope_number(full, "rope_theta", f"{where}: rope_parameters.full_attention"),
                rope_local_theta=_rope_number(local, "rope_theta", f"{where}: rope_parameters.sliding_attention"),
                **_rope_scaling_fields(full, f"{where}: rope_parameters.full_attention"))


def _rope_type(rope: dict[str, Any], where: str) -> str:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise SlmforgeError(f"{where}: rope_type {kind!r} is not supported; slmforge has default, linear, llama3")
    return kind


def _rope_scaling_fields(rope: dict[str, Any], where: str) -> dict[str, Any]:
    kind = _rope_type(rope, where)
    if kind == "default":
        return dict(rope_scaling="none")
    fields: dict[str, Any] = dict(rope_scaling=kind, rope_scaling_factor=_rope_number(rope, "factor", where))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=_rope_number(rope, "low_freq_factor", where),
                      rope_high_freq_factor=_rope_number(rope, "high_freq_factor", where),
                      rope_original_max_seq_len=_rope_number(rope, "original_max_position_embeddings", where, int))
    return fields


def _rope_number(rope: dict[str, Any], key: str, where: str, tp: type = float) -> Any:
    """One number of a RoPE settings table, refused in one line when missing or not a number."""
    if rope.get(key) is None:
        raise SlmforgeError(f"{where}: {key} is missing")
    return typed(where, key, rope[key], tp)


def hf_field_names(cfg: DecoderConfig) -> dict[str, str]:
    """Our field -> the config.json field it comes from (for messages about a config.json)."""
    return dict(_HF_FIELD_NAMES)


# ---------------------------------------------------------------- weight names


def hf_name(cfg: DecoderConfig, name: str) -> str:
    """transformers' name for one of our state-dict keys (see the table at the top of this file)."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    parts = name.split(".")  # layers, i, module, ...
    if parts[0] != "layers" or len(parts) < 4 or parts[2] not in _LAYER_MODULES[cfg.family]:
        raise KeyError(f"no Hugging Face name for {name!r} in family {cfg.family}")
    return ".".join(["model", "layers", parts[1], _LAYER_MODULES[cfg.family][parts[2]], *parts[3:]])


def state_dict_to_hf(cfg: DecoderConfig, state_dict: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names (tied models: embed_tokens only), contiguous on CPU."""
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        out[hf_name(cfg, name)] = tensor
    return out


# Checkpoint names that carry no weights of the text model: RoPE buffers some old checkpoints saved,
# and the vision tower / projector of the multimodal Gemma 3.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
_MULTIMODAL_PREFIXES = {  # transformers 4.x layout, then 5.x layout
    "language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
}
_MULTIMODAL_SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")


def text_weight_name(name: str, multimodal: bool) -> str | None:
    """A checkpoint tensor name as the causal-LM name (None = not part of the text model)."""
    if name.endswith(_SKIPPED_SUFFIXES):
        return None
    if multimodal:
        for old, new in _MULTIMODAL_PREFIXES.items():
            if name.startswith(old):
                return new + name[len(old):]
        if name.startswith(_MULTIMODAL_SKIPPED):
            return None
    return name


def plan_import(cfg: DecoderConfig, expected: dict[str, torch.Size], available: dict[str, tuple[int, ...]],
                multimodal: bool = False, where: str = "checkpoint") -> dict[str, str]:
    """Match checkpoint tensors to our parameters: {our name: checkpoint name}.

    `expected` holds our names and shapes, `available` the checkpoint's names and shapes. Raises one
    SlmforgeError naming the first tensor that is missing, unexpected or of the wrong shape.
    """
    by_hf_name = {text_weight_name(name, multimodal): name for name in available}
    by_hf_name.pop(None, None)
    plan: dict[str, str] = {}
    for ours, shape in expected.items():
        wanted = hf_name(cfg, ours)
        if wanted not in by_hf_name:
            raise SlmforgeError(f"{where}: missing tensor {wanted}")
        stored = by_hf_name.pop(wanted)
        if tuple(available[stored]) != tuple(shape):
            raise SlmforgeError(f"{where}: tensor {stored} has shape {tuple(available[stored])}, "
                                f"config.json implies {tuple(shape)}")
        plan[ours] = stored
    if cfg.tie_embeddings:
        by_hf_name.pop("lm_head.weight", None)  # some tied checkpoints store a copy of embed_tokens
    if by_hf_name:
        extra = sorted(by_hf_name.values())[0]
        raise SlmforgeError(f"{where}: unexpected tensor {extra} (not part of a {ARCHITECTURES[cfg.family]} "
                            f"as config.json describes it)")
    return plan
