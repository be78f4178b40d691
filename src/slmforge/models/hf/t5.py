"""Hugging Face names of the `t5` family (see `models/hf/__init__.py` for the adapter interface).

    family   transformers class                                   config.json model_type
    t5       T5ForConditionalGeneration (what we write and read)  t5
             MT5ForConditionalGeneration (read as well)           mt5

The `encdec` family (RoPE, grouped-query heads) has no transformers class and is refused by export.
Everything here works on plain dicts and tensors (config.json, safetensors), so export and import need
no `transformers`.

The head. T5 v1.1 has a separate `lm_head` and no output scaling; T5 v1.0 tied it to `shared` and
multiplied the decoder output by d_model^-0.5. transformers 4.x reads `tie_word_embeddings` for both;
5.x always ties in its config, keeps the scaling choice in `scale_decoder_outputs` (false when the file
says `tie_word_embeddings: false`), and unties again when the checkpoint holds a different lm_head
(logging a warning that this layout cannot avoid). We write `tie_word_embeddings` as our config has it.
Reading, the scaling decides: `scale_decoder_outputs` when the file has it, else `tie_word_embeddings`;
scaled = tied (v1.0); unscaled = our untied v1.1 head, which starts as a copy of `shared` when the
checkpoint stores no lm_head (a T5 built and saved by transformers 5 is unscaled and tied).

Weight names (ours -> transformers); S is encoder or decoder, and the MLP is layer 1 of an encoder
block, layer 2 of a decoder block:

    embed.weight                          shared.weight  (encoder/decoder.embed_tokens: copies, not stored)
    S.relative_bias.weight                S.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    S.layers.{i}.attn_norm.weight         S.block.{i}.layer.0.layer_norm.weight
    S.layers.{i}.attn.{q,k,v,o}_proj      S.block.{i}.layer.0.SelfAttention.{q,k,v,o}
    decoder.layers.{i}.cross_norm.weight  decoder.block.{i}.layer.1.layer_norm.weight
    decoder.layers.{i}.cross_attn.{q,k,v,o}_proj
                                          decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}
    S.layers.{i}.mlp_norm.weight          S.block.{i}.layer.{1|2}.layer_norm.weight
    S.layers.{i}.mlp.gate_proj            S.block.{i}.layer.{1|2}.DenseReluDense.wi_0   (the half GELU sees)
    S.layers.{i}.mlp.up_proj              S.block.{i}.layer.{1|2}.DenseReluDense.wi_1
    S.layers.{i}.mlp.down_proj            S.block.{i}.layer.{1|2}.DenseReluDense.wo
    S.norm.weight                         S.final_layer_norm.weight
    lm_head.weight                        lm_head.weight                                (untied only)
"""

from __future__ import annotations

from typing import Any

import torch

from slmforge.errors import SlmforgeError
from slmforge.models.encdec_config import EncDecConfig
from slmforge.models.hf.reader import ConfigReader, checked_config, hf_types

ARCHITECTURE = "T5ForConditionalGeneration"
READABLE = {"T5ForConditionalGeneration": "t5", "MT5ForConditionalGeneration": "mt5"}

# transformers' T5Config defaults for fields a config.json may leave out.
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32_128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu", tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, n_positions=512,
)

# Our gate activation <-> feed_forward_proj. "gated-gelu" means the tanh approximation (gelu_new) in
# transformers, for compatibility with the T5 v1.1 checkpoints; the exact GELU is "gated-gelu_python".
_ACTIVATION_TO_HF = {"gelu_tanh": "gated-gelu", "silu": "gated-silu", "gelu": "gated-gelu_python"}
_ACTIVATION_FROM_HF = {"gated-gelu": "gelu_tanh", "gated-gelu_new": "gelu_tanh", "gated-gelu_pytorch_tanh": "gelu_tanh",
                       "gated-silu": "silu", "gated-swish": "silu", "gated-gelu_python": "gelu"}

_ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_MLP = {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"}
# Checkpoint tensors T5ForConditionalGeneration does not load either: copies of the shared embedding,
# and a cross-attention relative bias some old checkpoints carry and transformers ignores.
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


# ---------------------------------------------------------------- EncDecConfig -> config.json


def check_exportable(cfg: EncDecConfig) -> None:
    """Raise a SlmforgeError naming the first field T5ForConditionalGeneration cannot express."""
    if cfg.family != "t5":
        raise SlmforgeError(f"model.family: {cfg.family!r} (RoPE, grouped-query attention) has no Hugging Face "
                            f"class; only the t5 layout exports, as {ARCHITECTURE}")
    if cfg.num_kv_heads != cfg.num_heads:
        raise SlmforgeError(f"model.num_kv_heads: {ARCHITECTURE} has one key/value head per query head "
                            f"({cfg.num_heads}), this model has {cfg.num_kv_heads}")


def config_to_hf(cfg: EncDecConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json contents for `cfg`, readable by transformers 4.5x and 5.x alike."""
    check_exportable(cfg)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "feed_forward_proj": _ACTIVATION_TO_HF[cfg.activation],
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "is_encoder_decoder": True,
        "n_positions": cfg.max_seq_len,  # informational: T5 has no position table
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id if pad_token_id is not None else cfg.decoder_start_token_id,
        "use_cache": True,
        "torch_dtype": dtype,  # 4.x reads torch_dtype, 5.x dtype
        "dtype": dtype,
    }


# ---------------------------------------------------------------- config.json -> EncDecConfig


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> EncDecConfig:
    """The `EncDecConfig` equivalent to a T5 / mT5 config.json dict (4.5x or 5.x form)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in READABLE and not (arch is None and hf.get("model_type") in READABLE.values()):
        raise SlmforgeError(f"{where}: architecture {arch or '(none)'} (model_type {hf.get('model_type')!r}) is not "
                            f"a supported encoder-decoder; slmforge imports {', '.join(READABLE)}")
    get = ConfigReader(hf, HF_DEFAULTS, where, _HF_TYPES, layer_fields=("num_layers", "num_decoder_layers"))
    projection = get("feed_forward_proj")
    if projection not in _ACTIVATION_FROM_HF:
        raise SlmforgeError(f"{where}: feed_forward_proj={projection!r} is not supported; slmforge builds T5 v1.1's "
                            f"gated MLP ({', '.join(_ACTIVATION_FROM_HF)})")
    get.reject_truthy("is_decoder", "a decoder-only T5 stack is not a T5ForConditionalGeneration")
    # The head (see the module docstring): scaled output <=> tied in our layout.
    scaled = get.present("scale_decoder_outputs")
    if scaled is None:
        scaled = get("tie_word_embeddings")
    layers = get("num_layers")
    start = get.present("decoder_start_token_id")
    fields = dict(
        family="t5", vocab_size=get("vocab_size"), hidden_size=get("d_model"), head_dim=get("d_kv"),
        intermediate_size=get("d_ff"), num_layers=layers,
        num_decoder_layers=get.optional("num_decoder_layers") or layers, num_heads=get("num_heads"),
        relative_buckets=get("relative_attention_num_buckets"),
        relative_max_distance=get("relative_attention_max_distance"),
        activation=_ACTIVATION_FROM_HF[projection], norm_eps=get("layer_norm_epsilon"),
        tie_embeddings=bool(scaled), dropout=get("dropout_rate"), max_seq_len=get("n_positions"),
        decoder_start_token_id=start if start is not None else get("pad_token_id"),
    )
    return checked_config(EncDecConfig(**fields), where, _HF_FIELD_NAMES)


# For error messages and type checks: our field -> the config.json field it came from.
_HF_FIELD_NAMES = dict(vocab_size="vocab_size", hidden_size="d_model", head_dim="d_kv", intermediate_size="d_ff",
                       num_layers="num_layers", num_decoder_layers="num_decoder_layers", num_heads="num_heads",
                       relative_buckets="relative_attention_num_buckets",
                       relative_max_distance="relative_attention_max_distance", norm_eps="layer_norm_epsilon",
                       dropout="dropout_rate", max_seq_len="n_positions", tie_embeddings="tie_word_embeddings",
                       decoder_start_token_id="decoder_start_token_id")
_HF_TYPES = hf_types(EncDecConfig, _HF_FIELD_NAMES, feed_forward_proj=str, scale_decoder_outputs=bool,
                     pad_token_id=int)


def hf_field_names(cfg: EncDecConfig) -> dict[str, str]:
    """Our field -> the config.json field it comes from (for messages about a config.json)."""
    return dict(_HF_FIELD_NAMES)


# ---------------------------------------------------------------- weight names


def hf_name(cfg: EncDecConfig, name: str) -> str:
    """Where one of our state-dict keys lives in transformers' checkpoint (see the table at the top)."""
    if name == "embed.weight":
        return "shared.weight"
    if name == "lm_head.weight":
        return name
    side, _, rest = name.partition(".")
    if side in ("encoder", "decoder"):
        if rest == "relative_bias.weight":
            return f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        if rest == "norm.weight":
            return f"{side}.final_layer_norm.weight"
        parts = rest.split(".")  # layers, i, module, [projection], weight
        if parts[0] == "layers" and len(parts) >= 4:
            block, module = f"{side}.block.{parts[1]}", parts[2]
            mlp_layer = 2 if side == "decoder" else 1
            if module == "attn_norm" and len(parts) == 4:
                return f"{block}.layer.0.layer_norm.weight"
            if module == "cross_norm" and side == "decoder" and len(parts) == 4:
                return f"{block}.layer.1.layer_norm.weight"
            if module == "mlp_norm" and len(parts) == 4:
                return f"{block}.layer.{mlp_layer}.layer_norm.weight"
            if module == "attn" and parts[3] in _ATTENTION:
                return f"{block}.layer.0.SelfAttention.{_ATTENTION[parts[3]]}.weight"
            if module == "cross_attn" and side == "decoder" and parts[3] in _ATTENTION:
                return f"{block}.layer.1.EncDecAttention.{_ATTENTION[parts[3]]}.weight"
            if module == "mlp" and parts[3] in _MLP:
                return f"{block}.layer.{mlp_layer}.DenseReluDense.{_MLP[parts[3]]}.weight"
    raise KeyError(f"no Hugging Face name for {name!r} in family {cfg.family}")


def state_dict_to_hf(cfg: EncDecConfig, state_dict: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names, contiguous on CPU."""
    check_exportable(cfg)
    return {hf_name(cfg, name): tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
            for name, tensor in state_dict.items()}


def plan_import(cfg: EncDecConfig, expected: dict[str, torch.Size], available: dict[str, tuple[int, ...]],
                multimodal: bool = False, where: str = "checkpoint") -> dict[str, str]:
    """{our name: checkpoint name}. Raises one SlmforgeError naming the first tensor that is missing,
    unexpected or of the wrong shape. A tied model ignores a stored lm_head (a copy of shared); an
    untied one without a stored lm_head starts from shared (transformers 5 ties unscaled T5s too)."""
    ignored = set(_IGNORED) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    stored = {name for name in available if name not in ignored}
    plan: dict[str, str] = {}
    for ours, shape in expected.items():
        name = hf_name(cfg, ours)
        if name == "lm_head.weight" and name not in stored and "shared.weight" in stored:
            # transformers 5 saves an unscaled T5 tied (one matrix): our untied head starts as its copy.
            name = "shared.weight"
        if name not in stored:
            raise SlmforgeError(f"{where}: missing tensor {name}")
        if tuple(available[name]) != tuple(shape):
            raise SlmforgeError(f"{where}: tensor {name} has shape {tuple(available[name])}, "
                                f"config.json implies {tuple(shape)}")
        plan[ours] = name
    extra = sorted(stored - set(plan.values()))
    if extra:
        raise SlmforgeError(f"{where}: unexpected tensor {extra[0]} (not part of a {ARCHITECTURE} as config.json "
                            f"describes it)")
    return plan
