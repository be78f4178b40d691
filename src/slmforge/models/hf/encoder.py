"""Hugging Face names of the encoder families (see `models/hf/__init__.py` for the adapter interface).

Three families map onto `EncoderConfig`:

    family       transformers class                        config.json model_type
    bert         BertForMaskedLM                           bert
    roberta      XLMRobertaForMaskedLM (what we write)     xlm-roberta
                 RobertaForMaskedLM (read as well)         roberta
    modernbert   ModernBertForMaskedLM                     modernbert

A model fine-tuned for a task (`head = "classify"` / `"tag"`) is written as, and read from, the
family's *ForSequenceClassification / *ForTokenClassification (BertFor..., XLMRobertaFor... (RobertaFor...
read as well), ModernBertFor...), with id2label / label2id from `labels`.

Everything here works on plain dicts and tensors (config.json, safetensors), so export and import
need no `transformers`. ModernBERT configs are written so that transformers 4.5x
(global_attn_every_n_layers / local_attention / global_rope_theta / local_rope_theta) and 5.x
(layer_types / sliding_window / rope_parameters) build the same model; both forms are read back, and a
file whose two forms disagree is refused, since the two versions would build different models from it.

Weight names (ours -> transformers); P is `bert.` or `roberta.`:

    bert, roberta
    embed.weight                        P embeddings.word_embeddings.weight
    pos_embed.weight                    P embeddings.position_embeddings.weight
    type_embed.weight                   P embeddings.token_type_embeddings.weight
    embed_norm.{weight,bias}            P embeddings.LayerNorm.{weight,bias}
    layers.{i}.attn.{q,k,v}_proj        P encoder.layer.{i}.attention.self.{query,key,value}
    layers.{i}.attn.o_proj              P encoder.layer.{i}.attention.output.dense
    layers.{i}.attn_norm                P encoder.layer.{i}.attention.output.LayerNorm
    layers.{i}.mlp.up_proj              P encoder.layer.{i}.intermediate.dense
    layers.{i}.mlp.down_proj            P encoder.layer.{i}.output.dense
    layers.{i}.mlp_norm                 P encoder.layer.{i}.output.LayerNorm
    head.dense                          cls.predictions.transform.dense         (bert)
                                        lm_head.dense                           (roberta)
    head.norm                           cls.predictions.transform.LayerNorm     (bert)
                                        lm_head.layer_norm                      (roberta)
    head.bias                           cls.predictions.bias / lm_head.bias
    (embed.weight, tied)                cls.predictions.decoder.weight / lm_head.decoder.weight  (not stored)

    modernbert (no biases anywhere but the vocabulary bias)
    embed.weight                        model.embeddings.tok_embeddings.weight
    embed_norm.weight                   model.embeddings.norm.weight
    layers.{i}.attn_norm.weight         model.layers.{i}.attn_norm.weight       (none in layer 0)
    layers.{i}.attn.{q,k,v}_proj.weight model.layers.{i}.attn.Wqkv.weight       rows [0:d], [d:2d], [2d:3d]
    layers.{i}.attn.o_proj.weight       model.layers.{i}.attn.Wo.weight
    layers.{i}.mlp_norm.weight          model.layers.{i}.mlp_norm.weight
    layers.{i}.mlp.gate_proj.weight     model.layers.{i}.mlp.Wi.weight          rows [0:f] (the half GELU sees)
    layers.{i}.mlp.up_proj.weight       model.layers.{i}.mlp.Wi.weight          rows [f:2f]
    layers.{i}.mlp.down_proj.weight     model.layers.{i}.mlp.Wo.weight
    final_norm.weight                   model.final_norm.weight
    head.dense.weight                   head.dense.weight
    head.norm.weight                    head.norm.weight
    head.bias                           decoder.bias
    (embed.weight, tied)                decoder.weight                          (not stored)

    classification heads (in place of the masked-LM head; P as above)
    classifier.dense      bert classify: bert.pooler.dense; roberta classify: classifier.dense;
                          modernbert: head.dense
    classifier.norm       modernbert: head.norm
    classifier.out        classifier (bert, modernbert, roberta tag); classifier.out_proj (roberta classify)
"""

from __future__ import annotations

from typing import Any

import torch

from slmforge.errors import SlmforgeError
from slmforge.models.hf.reader import ConfigReader, checked_config, hf_types, typed
from slmforge.models.encoder_config import EncoderConfig

ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "XLMRobertaForMaskedLM",
                 "modernbert": "ModernBertForMaskedLM"}
MODEL_TYPES = {"bert": "bert", "roberta": "xlm-roberta", "modernbert": "modernbert"}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "XLMRoberta", "modernbert": "ModernBert"}
# Our head -> the suffix of transformers' class name.
HEAD_CLASSES = {"mlm": "ForMaskedLM", "classify": "ForSequenceClassification", "tag": "ForTokenClassification"}
# Every class we read: architecture -> (family, model_type).
READABLE = {
    "BertForMaskedLM": ("bert", "bert"),
    "XLMRobertaForMaskedLM": ("roberta", "xlm-roberta"),
    "RobertaForMaskedLM": ("roberta", "roberta"),
    "ModernBertForMaskedLM": ("modernbert", "modernbert"),
}
for _name, _read in list(READABLE.items()):  # the classification models of each family, read alike
    for _suffix in ("ForSequenceClassification", "ForTokenClassification"):
        READABLE[_name.removesuffix("ForMaskedLM") + _suffix] = _read


def architecture(cfg: EncoderConfig) -> str:
    """transformers' class for this config: the family's masked-LM, sequence- or token-classification model."""
    return _CLASS_PREFIX[cfg.family] + HEAD_CLASSES[cfg.head or "mlm"]


def architecture_head(arch: str | None) -> str:
    """Our head for a transformers class name (masked LM for none)."""
    for head, suffix in HEAD_CLASSES.items():
        if arch and arch.endswith(suffix):
            return head
    return "mlm"

# transformers' own defaults for fields a config.json may leave out (BertConfig, XLMRobertaConfig /
# RobertaConfig, ModernBertConfig). Note XLMRobertaConfig's layer_norm_eps is 1e-12 like BERT's; the
# published XLM-R and RoBERTa checkpoints state 1e-5 in their config.json.
_BERT_DEFAULTS = dict(
    vocab_size=30_522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, tie_word_embeddings=True,
    position_embedding_type="absolute", is_decoder=False, add_cross_attention=False,
)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": _BERT_DEFAULTS,
    "roberta": dict(_BERT_DEFAULTS, pad_token_id=1),
    "modernbert": dict(
        vocab_size=50_368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
        hidden_activation="gelu", max_position_embeddings=8192, initializer_range=0.02, norm_eps=1e-5,
        norm_bias=False, pad_token_id=50_283, attention_bias=False, attention_dropout=0.0, local_attention=128,
        global_attn_every_n_layers=3, global_rope_theta=160_000.0, local_rope_theta=10_000.0,
        embedding_dropout=0.0, mlp_bias=False, mlp_dropout=0.0, decoder_bias=True, classifier_bias=False,
        classifier_activation="gelu", tie_word_embeddings=True,
    ),
}

# Activation names transformers uses for the exact (erf) GELU; the tanh approximations differ.
_EXACT_GELU = ("gelu", "gelu_python")

# ---------------------------------------------------------------- weight-name tables


def _bert_embeddings(prefix: str) -> dict[str, str]:
    return {"embed": f"{prefix}.embeddings.word_embeddings", "pos_embed": f"{prefix}.embeddings.position_embeddings",
            "type_embed": f"{prefix}.embeddings.token_type_embeddings", "embed_norm": f"{prefix}.embeddings.LayerNorm"}


# Our module -> transformers' module, outside the layers. "head" alone owns the vocabulary bias.
_OUTER_MODULES = {
    "bert": {**_bert_embeddings("bert"), "head.dense": "cls.predictions.transform.dense",
             "head.norm": "cls.predictions.transform.LayerNorm", "head": "cls.predictions"},
    "roberta": {**_bert_embeddings("roberta"), "head.dense": "lm_head.dense", "head.norm": "lm_head.layer_norm",
                "head": "lm_head"},
    "modernbert": {"embed": "model.embeddings.tok_embeddings", "embed_norm": "model.embeddings.norm",
                   "final_norm": "model.final_norm", "head.dense": "head.dense", "head.norm": "head.norm",
                   "head": "decoder"},
}
_BERT_LAYER = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
               "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
               "attn_norm": "attention.output.LayerNorm", "mlp.up_proj": "intermediate.dense",
               "mlp.down_proj": "output.dense", "mlp_norm": "output.LayerNorm"}
_LAYER_MODULES = {
    "bert": ("bert.encoder.layer", _BERT_LAYER),
    "roberta": ("roberta.encoder.layer", _BERT_LAYER),
    "modernbert": ("model.layers", {"attn_norm": "attn_norm", "attn.o_proj": "attn.Wo", "mlp_norm": "mlp_norm",
                                    "mlp.down_proj": "mlp.Wo"}),
}
# ModernBERT's fused matrices: our module -> (its module, which block of rows). Wi's first half is the
# input of the GELU (`input, gate = Wi(x).chunk(2)`, then act(input) * gate), i.e. our gate_proj.
_FUSED = {"attn.q_proj": ("attn.Wqkv", 0), "attn.k_proj": ("attn.Wqkv", 1), "attn.v_proj": ("attn.Wqkv", 2),
          "mlp.gate_proj": ("mlp.Wi", 0), "mlp.up_proj": ("mlp.Wi", 1)}

# Checkpoint tensors a *ForMaskedLM does not load either: copies of tied weights, BERT's pooler and
# next-sentence head (checkpoints saved from BertForPreTraining), and old persistent index buffers.
_IGNORED = {
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
    "modernbert": ("decoder.weight",),
}
_IGNORED_PREFIXES = ("bert.pooler.", "roberta.pooler.", "cls.seq_relationship.")
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

Source = str | tuple[str, int, int]
"""Where one of our tensors lives in a transformers checkpoint: a name, or rows start:stop of one."""


# ---------------------------------------------------------------- EncoderConfig -> config.json


def check_exportable(cfg: EncoderConfig) -> None:
    """Raise a SlmforgeError naming the first field transformers' class for this family cannot express."""
    if cfg.family not in ARCHITECTURES:
        raise SlmforgeError(f"model.family: {cfg.family!r} has no Hugging Face mapping; "
                            f"supported encoders: {', '.join(ARCHITECTURES)}")
    arch = architecture(cfg)
    if cfg.family == "modernbert" and cfg.type_vocab_size:
        raise SlmforgeError(f"model.type_vocab_size: {arch} has no token-type embeddings, "
                            f"this model has {cfg.type_vocab_size}")
    if cfg.family != "modernbert" and not cfg.type_vocab_size:
        raise SlmforgeError(f"model.type_vocab_size: {arch} always adds token-type embeddings; "
                            f"this model has none")
    if cfg.family == "roberta" and cfg.pad_token_id >= cfg.vocab_size:
        raise SlmforgeError(f"model.pad_token_id: {arch} gives the pad id an embedding row, so it must be "
                            f"below vocab_size ({cfg.vocab_size}); this model has {cfg.pad_token_id}")


def config_to_hf(cfg: EncoderConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json contents for `cfg`, readable by transformers 4.5x and 5.x alike."""
    check_exportable(cfg)
    hf: dict[str, Any] = {
        "architectures": [architecture(cfg)],
        "model_type": MODEL_TYPES[cfg.family],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": _exported_pad_id(cfg, pad_token_id),
        # 4.x reads torch_dtype, 5.x reads dtype (and accepts torch_dtype silently).
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    hf.update(_modernbert_fields(cfg, bos_token_id, eos_token_id) if cfg.family == "modernbert"
              else _bert_fields(cfg))
    if cfg.has_classifier:
        hf.update(_label_fields(cfg))
    return hf


def _label_fields(cfg: EncoderConfig) -> dict[str, Any]:
    """id2label / label2id (transformers derives num_labels from them), and what the head computes."""
    fields: dict[str, Any] = {"id2label": {str(i): label for i, label in enumerate(cfg.labels)},
                              "label2id": {label: i for i, label in enumerate(cfg.labels)}}
    if cfg.head == "classify":
        fields["problem_type"] = "single_label_classification"  # softmax over labels, cross-entropy
    if cfg.family == "modernbert":
        fields.update(classifier_pooling=cfg.pooling or "cls", classifier_dropout=cfg.dropout)
    return fields


def _exported_pad_id(cfg: EncoderConfig, tokenizer_pad_id: int | None) -> int | None:
    """RoBERTa numbers positions from its pad id, so config.json must carry the model's; the others
    use the id only to zero an embedding row at initialisation, and the tokenizer's is the useful one."""
    if cfg.family != "roberta":
        return tokenizer_pad_id
    if tokenizer_pad_id is not None and tokenizer_pad_id != cfg.pad_token_id:
        raise SlmforgeError(f"model.pad_token_id: {cfg.pad_token_id}, but the tokenizer pads with id "
                            f"{tokenizer_pad_id}; {ARCHITECTURES['roberta']} numbers positions from the pad id, "
                            f"so the two must agree")
    return cfg.pad_token_id


def _bert_fields(cfg: EncoderConfig) -> dict[str, Any]:
    return {
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.position_rows,  # RoBERTa: max_seq_len + pad_token_id + 1
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",  # 4.x reads it; 5.x knows no other kind
        "is_decoder": False,
        "add_cross_attention": False,
        "classifier_dropout": None,
    }


def _modernbert_fields(cfg: EncoderConfig, bos_token_id: int | None, eos_token_id: int | None
                       ) -> dict[str, Any]:
    layer_types = ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_layers)]
    has_sliding = "sliding_attention" in layer_types
    # transformers needs a window even when no layer uses one; the context length means "none".
    window = cfg.local_window if cfg.local_window is not None else cfg.max_seq_len
    return {
        "hidden_activation": "gelu",
        "max_position_embeddings": cfg.max_seq_len,
        "norm_eps": cfg.norm_eps,
        "cls_token_id": bos_token_id,
        "sep_token_id": eos_token_id,
        # 5.x: per-layer kinds; sliding_window is the half-window (|i - j| <= sliding_window).
        "layer_types": layer_types,
        "sliding_window": window // 2,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
        # 4.x: layer i is global iff i % global_attn_every_n_layers == 0; |i - j| <= local_attention // 2.
        "global_attn_every_n_layers": cfg.global_every if has_sliding else 1,
        "local_attention": window,
        "global_rope_theta": cfg.rope_theta,
        "local_rope_theta": cfg.rope_local_theta,
        # Our one dropout rate; transformers drops inside the MLP, we after it (same at inference).
        "embedding_dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "mlp_dropout": cfg.dropout,
        "attention_bias": False,
        "mlp_bias": False,
        "norm_bias": False,
        "classifier_bias": False,
        "classifier_activation": "gelu",
        "decoder_bias": True,
        "sparse_prediction": False,
    }


# ---------------------------------------------------------------- config.json -> EncoderConfig


def encoder_family(hf: dict[str, Any], where: str = "config.json") -> str:
    """Our family for an encoder config.json (by architecture, else by model_type)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    for name, (family, model_type) in READABLE.items():
        if arch == name or (arch is None and hf.get("model_type") == model_type):
            return family
    raise SlmforgeError(f"{where}: architecture {arch or '(none)'} (model_type {hf.get('model_type')!r}) "
                        f"is not a supported encoder; slmforge imports {', '.join(READABLE)}")


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> EncoderConfig:
    """The `EncoderConfig` equivalent to a transformers config.json dict (4.5x or 5.x form)."""
    family = encoder_family(hf, where)
    names = _hf_field_names(family)
    get = ConfigReader(hf, HF_DEFAULTS[family], where, hf_types(EncoderConfig, names, **_HF_TYPES),
                       layer_fields=("num_hidden_layers",))
    head = architecture_head((hf.get("architectures") or [None])[0])
    if head == "mlm":
        get.require("tie_word_embeddings", (True,), "slmforge ties the MLM decoder to the input embeddings")
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        init_std=get("initializer_range"),
    )
    fields.update(_modernbert_config(get) if family == "modernbert" else _bert_config(get, family))
    if head != "mlm":
        fields.update(_label_config(hf, get, family, head))
    return checked_config(EncoderConfig(**fields), where, names)


def _label_config(hf: dict[str, Any], get: ConfigReader, family: str, head: str) -> dict[str, Any]:
    """head, labels (id2label in id order; transformers' LABEL_i names when only num_labels is given)
    and pooling of a classification model's config.json."""
    id2label = hf.get("id2label")
    if id2label is None:
        count = hf.get("num_labels", 2)
        if not isinstance(count, int) or isinstance(count, bool) or count < 2:
            raise SlmforgeError(f"{get.where}: num_labels={count!r}: a classifier needs at least two labels")
        labels = [f"LABEL_{i}" for i in range(count)]
    else:
        if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
            raise SlmforgeError(f"{get.where}: id2label must map ids to label names, got {id2label!r}")
        try:
            by_id = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise SlmforgeError(f"{get.where}: id2label keys must be ids 0, 1, ...; got {sorted(id2label)}") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise SlmforgeError(f"{get.where}: id2label must number labels 0 to {len(by_id) - 1}, got {sorted(by_id)}")
        labels = [by_id[i] for i in range(len(by_id))]
    problem = hf.get("problem_type")
    if head == "classify" and problem not in (None, "single_label_classification"):
        raise SlmforgeError(f"{get.where}: problem_type={problem!r}: slmforge classifiers pick one label per text "
                            f"(single_label_classification)")
    fields: dict[str, Any] = {"head": head, "labels": labels}
    if family == "modernbert" and head == "classify":
        pooling = hf.get("classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise SlmforgeError(f"{get.where}: classifier_pooling={pooling!r} is not supported (cls or mean)")
        fields["pooling"] = None if pooling == "cls" else pooling
    return fields


# For error messages and type checks: our field -> the config.json field it came from.
_HF_FIELD_NAMES = dict(vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
                       num_heads="num_attention_heads", intermediate_size="intermediate_size",
                       max_seq_len="max_position_embeddings", local_window="local_attention",
                       pad_token_id="pad_token_id", init_std="initializer_range")
# Every other config.json field the reader takes, with its type.
_HF_TYPES = dict(tie_word_embeddings=bool, hidden_act=str, hidden_activation=str, classifier_activation=str,
                 position_embedding_type=str, type_vocab_size=int, layer_norm_eps=float, norm_eps=float,
                 hidden_dropout_prob=float, attention_probs_dropout_prob=float, embedding_dropout=float,
                 attention_dropout=float, mlp_dropout=float, global_attn_every_n_layers=int, sliding_window=int,
                 layer_types=list[str], global_rope_theta=float, local_rope_theta=float,
                 rope_parameters=dict[str, Any], rope_scaling=dict[str, Any])


def _hf_field_names(family: str) -> dict[str, str]:
    """_HF_FIELD_NAMES plus the fields whose config.json name depends on the family."""
    if family == "modernbert":
        return dict(_HF_FIELD_NAMES, norm_eps="norm_eps", dropout="embedding_dropout",
                    rope_theta="global_rope_theta", rope_local_theta="local_rope_theta",
                    global_every="global_attn_every_n_layers")
    return dict(_HF_FIELD_NAMES, norm_eps="layer_norm_eps", dropout="hidden_dropout_prob",
                type_vocab_size="type_vocab_size")


def _bert_config(get: ConfigReader, family: str) -> dict[str, Any]:
    get.require("hidden_act", _EXACT_GELU, "BERT and RoBERTa in slmforge use the exact (erf) GELU")
    get.require("position_embedding_type", ("absolute", None), "slmforge has learned absolute positions only")
    get.require("is_decoder", (False, None), "slmforge encoders attend in both directions")
    get.require("add_cross_attention", (False, None), "slmforge encoders have no cross-attention")
    type_vocab_size = get("type_vocab_size")
    if type_vocab_size < 1:
        raise SlmforgeError(f"{get.where}: type_vocab_size={type_vocab_size}: the model always adds a "
                            f"token-type embedding, so it needs at least one")
    dropout = get.one_value("hidden_dropout_prob", "attention_probs_dropout_prob")
    positions = get("max_position_embeddings")
    fields = dict(max_seq_len=positions, norm_eps=float(get("layer_norm_eps")), type_vocab_size=type_vocab_size,
                  dropout=float(dropout))
    if family == "roberta":
        # Real tokens sit at positions pad + 1 .. pad + T: pad + 1 rows of the table are never a token's.
        pad = get("pad_token_id")
        fields.update(pad_token_id=pad, max_seq_len=positions - pad - 1)
    elif isinstance(get.optional("pad_token_id"), int):
        fields.update(pad_token_id=get.optional("pad_token_id"))
    return fields


def _modernbert_config(get: ConfigReader) -> dict[str, Any]:
    get.require("hidden_activation", _EXACT_GELU, "ModernBERT in slmforge uses the exact (erf) GELU")
    get.require("classifier_activation", _EXACT_GELU, "the MLM head in slmforge uses the exact (erf) GELU")
    for name in ("attention_bias", "mlp_bias", "norm_bias", "classifier_bias"):
        get.require(name, (False,), "ModernBERT in slmforge has no biases")
    get.require("decoder_bias", (True,), "slmforge's MLM head always has a vocabulary bias")
    num_layers = get("num_hidden_layers")
    fields = dict(max_seq_len=get("max_position_embeddings"), norm_eps=float(get("norm_eps")), type_vocab_size=0,
                  dropout=float(get.one_value("embedding_dropout", "attention_dropout", "mlp_dropout")))
    pad = get.optional("pad_token_id")
    if isinstance(pad, int):
        fields.update(pad_token_id=pad)
    fields.update(_modernbert_layers(get, num_layers))
    fields.update(_modernbert_rope(get))
    return fields


def _modernbert_layers(get: ConfigReader, num_layers: int) -> dict[str, Any]:
    """local_window / global_every from layer_types + sliding_window (5.x) or the 4.x fields."""
    every_4x = get("global_attn_every_n_layers")
    if not isinstance(every_4x, int) or every_4x < 1:
        raise SlmforgeError(f"{get.where}: global_attn_every_n_layers={every_4x!r} must be a positive integer")
    types_4x = ["sliding_attention" if i % every_4x else "full_attention" for i in range(num_layers)]
    layer_types = get.present("layer_types")
    if layer_types is not None and "global_attn_every_n_layers" in get.data and layer_types != types_4x:
        raise SlmforgeError(f"{get.where}: layer_types and global_attn_every_n_layers={every_4x} disagree "
                            f"(transformers 5 reads the first, 4.x the second)")
    layer_types = layer_types if layer_types is not None else types_4x
    if len(layer_types) != num_layers:
        raise SlmforgeError(f"{get.where}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise SlmforgeError(f"{get.where}: layer_types: {unknown[0]!r} is not supported")
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if len(full) == num_layers:
        return dict(local_window=None, global_every=1)
    # Ours: layer i is global iff i % global_every == 0; one global layer (0) = a period of num_layers.
    every = full[1] if len(full) > 1 else num_layers
    expected = ["sliding_attention" if i % every else "full_attention" for i in range(num_layers)]
    if layer_types != expected:
        raise SlmforgeError(f"{get.where}: layer_types: only 'layers 0, n, 2n, ... are global' patterns are "
                            f"supported; global layers here are {full}")
    return dict(local_window=_modernbert_window(get), global_every=every)


def _modernbert_window(get: ConfigReader) -> int:
    """The whole window: 4.x's local_attention; 5.x's sliding_window is its half (and wins in 5.x)."""
    local_attention, half = get.present("local_attention"), get.present("sliding_window")
    if local_attention is not None and half is not None and local_attention // 2 != half:
        raise SlmforgeError(f"{get.where}: local_attention={local_attention} and sliding_window={half} disagree "
                            f"(transformers 5 attends |i - j| <= sliding_window, 4.x <= local_attention // 2)")
    if local_attention is not None:
        return int(local_attention)
    return 2 * int(half) if half is not None else int(get("local_attention"))


def _modernbert_rope(get: ConfigReader) -> dict[str, Any]:
    """RoPE bases per layer kind from rope_parameters (5.x) or global/local_rope_theta (4.x)."""
    params = get.present("rope_parameters") or {}
    scaling = get.present("rope_scaling") or {}
    thetas = {}
    for kind, old_field in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
        per_kind = typed(get.where, f"rope_parameters.{kind}", params.get(kind), dict[str, Any]) or {}
        rope = {**per_kind, **scaling}  # 5.x merges rope_scaling into both kinds
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise SlmforgeError(f"{get.where}: rope_parameters.{kind}: rope_type {rope_type!r} is not supported "
                                f"(ModernBERT in slmforge uses plain RoPE)")
        theta_4x = get.optional(old_field)
        theta = typed(get.where, f"rope_parameters.{kind}.rope_theta", rope.get("rope_theta"), float)
        if theta is not None and old_field in get.data and float(theta) != float(theta_4x):
            raise SlmforgeError(f"{get.where}: rope_parameters.{kind}.rope_theta={theta} and {old_field}={theta_4x} "
                                f"disagree (transformers 5 reads the first, 4.x the second)")
        thetas[kind] = float(theta if theta is not None else theta_4x)
    return dict(rope_theta=thetas["full_attention"], rope_local_theta=thetas["sliding_attention"])


def hf_field_names(cfg: EncoderConfig) -> dict[str, str]:
    """Our field -> the config.json field it comes from (for messages about a config.json)."""
    return _hf_field_names(cfg.family)


# ---------------------------------------------------------------- weight names


def hf_source(cfg: EncoderConfig, name: str) -> Source:
    """Where one of our state-dict keys lives in transformers' checkpoint (see the table at the top)."""
    module, _, param = name.rpartition(".")
    outer = _classifier_modules(cfg) if cfg.has_classifier else _OUTER_MODULES[cfg.family]
    if module.startswith("classifier.") and module not in outer:
        raise KeyError(f"no Hugging Face name for {name!r} in family {cfg.family}")
    if module in outer:
        return f"{outer[module]}.{param}"
    parts = module.split(".", 2)  # layers, i, sub-module
    if parts[0] == "layers" and len(parts) == 3:
        prefix, table = _LAYER_MODULES[cfg.family]
        if parts[2] in table:
            return f"{prefix}.{parts[1]}.{table[parts[2]]}.{param}"
        if cfg.family == "modernbert" and parts[2] in _FUSED:
            fused, block = _FUSED[parts[2]]
            rows = cfg.hidden_size if fused == "attn.Wqkv" else cfg.intermediate_size
            return f"{prefix}.{parts[1]}.{fused}.{param}", block * rows, (block + 1) * rows
    raise KeyError(f"no Hugging Face name for {name!r} in family {cfg.family}")


def _classifier_modules(cfg: EncoderConfig) -> dict[str, str]:
    """_OUTER_MODULES without the masked-LM head, with the classification head's names instead."""
    outer = {ours: theirs for ours, theirs in _OUTER_MODULES[cfg.family].items() if not ours.startswith("head")}
    if cfg.family == "modernbert":
        return {**outer, "classifier.dense": "head.dense", "classifier.norm": "head.norm",
                "classifier.out": "classifier"}
    if cfg.head == "tag":
        return {**outer, "classifier.out": "classifier"}
    if cfg.family == "bert":
        return {**outer, "classifier.dense": "bert.pooler.dense", "classifier.out": "classifier"}
    return {**outer, "classifier.dense": "classifier.dense", "classifier.out": "classifier.out_proj"}


def state_dict_to_hf(cfg: EncoderConfig, state_dict: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names, fused matrices concatenated, contiguous on CPU."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype)
        source = hf_source(cfg, name)
        if isinstance(source, tuple):
            target, start, _ = source
            blocks.setdefault(target, []).append((start, tensor))
        else:
            out[source] = tensor.contiguous()
    for target, parts in blocks.items():
        out[target] = torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])], dim=0)
    return out


def _canonical(name: str) -> str:
    """Checkpoints converted from TensorFlow BERT name LayerNorm parameters gamma / beta."""
    if name.endswith("LayerNorm.gamma"):
        return name.removesuffix("gamma") + "weight"
    if name.endswith("LayerNorm.beta"):
        return name.removesuffix("beta") + "bias"
    return name


def _ignored(cfg: EncoderConfig, name: str) -> bool:
    if cfg.family == "bert" and cfg.head == "classify" and name.startswith("bert.pooler."):
        return False  # BertForSequenceClassification's pooler is the first half of its head
    return (name in _IGNORED[cfg.family] or name.startswith(_IGNORED_PREFIXES)
            or name.endswith(_IGNORED_SUFFIXES))


def plan_import(cfg: EncoderConfig, expected: dict[str, torch.Size], available: dict[str, tuple[int, ...]],
                multimodal: bool = False, where: str = "checkpoint") -> dict[str, Source]:
    """Match checkpoint tensors to our parameters: {our name: checkpoint name, or (name, start, stop)}.

    `expected` holds our names and shapes, `available` the checkpoint's names and shapes. Raises one
    SlmforgeError naming the first tensor that is missing, unexpected or of the wrong shape; a fused
    tensor's shape is checked whole, against the blocks our tensors make of it.
    """
    stored = {_canonical(name): name for name in available if not _ignored(cfg, name)}
    sources = {ours: hf_source(cfg, ours) for ours in expected}
    implied: dict[str, tuple[int, ...]] = {}  # checkpoint name -> the shape our config implies
    for ours, source in sources.items():
        if isinstance(source, str):
            implied[source] = tuple(expected[ours])
        else:
            name, _, stop = source
            implied[name] = (max(stop, implied.get(name, (0,))[0]), *expected[ours][1:])
    plan: dict[str, Source] = {}
    for ours, source in sources.items():
        wanted = source if isinstance(source, str) else source[0]
        if wanted not in stored:
            raise SlmforgeError(f"{where}: missing tensor {wanted}")
        name = stored[wanted]
        if tuple(available[name]) != implied[wanted]:
            raise SlmforgeError(f"{where}: tensor {name} has shape {tuple(available[name])}, "
                                f"config.json implies {implied[wanted]}")
        plan[ours] = name if isinstance(source, str) else (name, source[1], source[2])
    extra = sorted(stored[wanted] for wanted in set(stored) - set(implied))
    if extra:
        raise SlmforgeError(f"{where}: unexpected tensor {extra[0]} (not part of a {architecture(cfg)} "
                            f"as config.json describes it)")
    return plan
