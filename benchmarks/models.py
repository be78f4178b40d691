"""The two sides of a model comparison: slmforge's model and transformers' model of the same config,
built from the exported config.json fields and holding exactly the same weights (through the HF
adapter that `slmforge export` uses)."""

from __future__ import annotations

import torch
from torch import nn

from slmforge.models import build_model
from slmforge.models.hf import config_to_hf, state_dict_to_hf
from slmforge.models.registry import config_from_dict, family


def model_config(table: dict):
    cfg = config_from_dict(dict(table), "benchmark model")
    cfg.validate()
    return cfg


def build_pair(table: dict, device: torch.device, seed: int = 0) -> tuple[object, nn.Module, nn.Module]:
    """(config, slmforge model, transformers model) with identical weights, both on `device`, in
    training mode. transformers gets `attn_implementation="sdpa"` (its default where supported)."""
    import transformers

    cfg = model_config(table)
    ours = build_model(cfg, device=device, seed=seed)
    config = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    auto = (transformers.AutoModelForCausalLM if family(cfg).kind == "decoder"
            else transformers.AutoModelForMaskedLM)
    theirs = auto.from_config(config, attn_implementation="sdpa")
    result = theirs.load_state_dict(state_dict_to_hf(cfg, ours.state_dict()), strict=False)
    # What the adapter leaves out must be tied to what it stores: the output matrix to the embeddings,
    # BERT's decoder bias to cls.predictions.bias.
    tied = theirs.get_output_embeddings().weight is theirs.get_input_embeddings().weight
    missing = [k for k in result.missing_keys
               if not (tied and k.endswith(("lm_head.weight", "decoder.weight", "decoder.bias")))]
    if result.unexpected_keys or missing:
        raise SystemExit(f"{table}: weights did not load into {type(theirs).__name__}: {result}")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise SystemExit(f"{table}: parameter counts differ: slmforge {n_ours:,}, transformers {n_theirs:,}")
    return cfg, ours.train(), theirs.to(device).train()


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block of the model's largest ModuleList, in place (both sides alike)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(lists, key=len):
        block.compile()


def describe(cfg) -> str:
    params = cfg.num_parameters()
    return (f"{cfg.family}, {params / 1e6:.1f}M params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
            f"vocab {cfg.vocab_size:,}")
