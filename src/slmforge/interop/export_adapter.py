"""`slmforge export RUN --format hf --adapter-only`: a LoRA run's adapter as a folder that
`peft.PeftModel.from_pretrained(base, OUT)` loads onto the Hugging Face export of the run's base
(`slmforge export RUN/base --format hf`): module names mapped to transformers' names, PEFT's config.

The step folders of a LoRA run already hold the adapter under slmforge's module names; this writes
the same tensors under the names a transformers model has.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from slmforge.checkpoint.meta import CheckpointMeta
from slmforge.checkpoint.reading import resolve_checkpoint
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import LoraConfig
from slmforge.finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, peft_config, require_peft
from slmforge.interop.export import output_dir
from slmforge.models.hf import decoder as hf_decoder
from slmforge.models.registry import family


def export_adapter(run: str | Path, out: str | Path, force: bool = False) -> Path:
    step_dir = resolve_checkpoint(run)
    info = CheckpointMeta.read(step_dir)
    lora = info.lora
    if not lora or not (step_dir / ADAPTER_WEIGHTS).is_file():
        raise SlmforgeError(f"{step_dir}: not a checkpoint of a LoRA run (no {ADAPTER_WEIGHTS}); export the "
                            f"whole model without --adapter-only")
    cfg = info.model_config()
    if family(cfg).kind != "decoder":
        raise SlmforgeError(f"{step_dir}: --adapter-only writes decoders' adapters (transformers' causal-LM names); "
                            f"export the merged {cfg.family} model without it")
    require_peft()  # before any work: the one-line install hint
    tensors = {}
    for name, tensor in load_file(step_dir / ADAPTER_WEIGHTS).items():
        module, _, rest = name.removeprefix(PEFT_PREFIX).partition(".lora_")
        tensors[PEFT_PREFIX + hf_decoder.hf_name(cfg, module + ".weight").removesuffix(".weight") + ".lora_" + rest] = tensor
    settings = LoraConfig(**lora)
    # slmforge decoders name their projections as Llama and Gemma do (q_proj ... down_proj).
    targets = sorted(settings.target_modules)
    # No base_model_name_or_path: the base is the export of RUN/base, wherever the user puts it.
    config = peft_config(settings, targets, task_type="CAUSAL_LM")
    with output_dir(Path(out), force) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if not (tmp / ADAPTER_CONFIG).is_file():  # pragma: no cover - peft always writes it
            raise SlmforgeError(f"{tmp}: peft wrote no {ADAPTER_CONFIG}")
    return Path(out)

