"""`slmforge import-hf`: a local Hugging Face checkpoint of a supported family -> an slmforge run folder.

    out/
        config.toml                          # [model] section equal to the checkpoint's config.json
        tokenizer/                           # tokenizer files copied from the Hugging Face folder
        checkpoints/step-000000/             # weights (float32) + meta.json with "imported_from"
        checkpoints/latest

Continue pretraining or fine-tune from it with `train.init_from=out`. No `transformers` import: config
fields and tensor names come from `slmforge.models.hf`; tensors are read one at a time.

Nothing is allocated for a bad folder: config.json's fields are type- and size-checked as they are read
(`slmforge.models.hf.reader`), every tensor's name and shape is compared with the config from the file
headers, and the float32 model must fit in the memory available, all before the model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import tomli_w
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slmforge import config as config_io
from slmforge.checkpoint.writing import save_checkpoint
from slmforge.errors import SlmforgeError
from slmforge.interop.export import copy_tokenizer_files, output_dir, read_json
from slmforge.models import ModelConfig, build_model
from slmforge.models.hf import config_from_hf, hf_field_names, is_multimodal, plan_import
from slmforge.models.hf.reader import describe_count, size_fields
from slmforge.models.registry import family
from slmforge.runtime import available_memory


def import_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert `hf_dir` (config.json + safetensors + tokenizer) into a run folder at `out`. Returns `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise SlmforgeError(f"{hf_dir}: no such folder")
    hf_config = read_json(hf_dir / "config.json")
    cfg = config_from_hf(hf_config, where=str(hf_dir / "config.json"))
    multimodal = is_multimodal(hf_config)
    if not (hf_dir / "tokenizer.json").is_file():
        raise SlmforgeError(f"{hf_dir}: no tokenizer.json (a slow-only tokenizer?); write one with "
                            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) and import again")
    with output_dir(out, force) as tmp:
        model = load_hf_weights(hf_dir, cfg, multimodal)
        imported_from = {"path": str(hf_dir.resolve()),
                         "architecture": (hf_config.get("architectures") or [None])[0],
                         "name_or_path": hf_config.get("_name_or_path"),
                         "transformers_version": hf_config.get("transformers_version")}
        save_checkpoint(tmp, 0, model, extra_meta={"imported_from": imported_from})
        (tmp / "tokenizer").mkdir()
        copy_tokenizer_files(hf_dir, tmp / "tokenizer")
        header = (f"# Made by `slmforge import-hf {hf_dir}`: the model section of a run config.\n"
                  f"# Continue pretraining from these weights with\n"
                  f"#   slmforge pretrain -c {out}/config.toml train.init_from={out} \\\n"
                  f"#       train.data=DATA train.out_dir=NEW_RUN\n")
        toml = header + tomli_w.dumps({"model": config_io.to_dict(cfg)})
        (tmp / "config.toml").write_text(toml, encoding="utf-8")
    return out


def load_hf_weights(hf_dir: Path, cfg: ModelConfig, multimodal: bool = False) -> nn.Module:
    """Build the model `cfg` describes and fill it from the checkpoint in `hf_dir`, checking every tensor.

    Nothing is allocated before every tensor's name and shape (from the safetensors header, or the
    mmapped pytorch_model.bin) matches the config and the float32 model fits in the memory available."""
    hf_dir = Path(hf_dir)
    with torch.device("meta"):  # shapes without memory or time
        skeleton = family(cfg).module_cls(cfg)
    expected = {name: t.shape for name, t in skeleton.state_dict().items()}
    with _Checkpoint(hf_dir) as checkpoint:
        plan = plan_import(cfg, expected, checkpoint.shapes, multimodal, where=str(hf_dir))
        _check_memory(hf_dir / "config.json", cfg, skeleton)
        model = build_model(cfg, device="cpu", seed=None)
        targets = model.state_dict()  # shares storage with the parameters
        with torch.no_grad():
            for ours, stored in plan.items():
                if isinstance(stored, tuple):  # rows of a fused tensor (ModernBERT's Wqkv, Wi)
                    name, start, stop = stored
                    targets[ours].copy_(checkpoint.tensor(name)[start:stop])
                else:
                    targets[ours].copy_(checkpoint.tensor(stored))  # bf16/fp16 checkpoints become float32
    return model


def _check_memory(where: Path, cfg: ModelConfig, skeleton: nn.Module) -> None:
    """Refuse, in one line, a model whose float32 weights exceed the memory this process can use."""
    count = sum(t.numel() for t in [*skeleton.parameters(), *skeleton.buffers()])  # shared tensors once
    available = available_memory()
    if available is not None and count * 4 > available:
        raise SlmforgeError(f"{where}: {size_fields(cfg, hf_field_names(cfg))} describe a model of "
                            f"{describe_count(count)}, {count * 4 / 2**30:,.1f} GiB as float32, more than the "
                            f"{available / 2**30:,.1f} GiB of memory available")


class _Checkpoint:
    """Tensor names, shapes and lazy reads over model.safetensors, its shards, or pytorch_model.bin."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        self.files = _weight_files(hf_dir)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, object] = {}
        self._handles = []
        for path in self.files:
            for name, shape, source in self._scan(path):
                self.shapes[name] = shape
                self._where[name] = source

    def _scan(self, path: Path) -> Iterator[tuple[str, tuple[int, ...], object]]:
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise SlmforgeError(f"{path}: cannot read weights ({e})") from None
            self._handles.append(handle)
            for name in handle.keys():
                yield name, tuple(handle.get_slice(name).get_shape()), handle
            return
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for truncated or foreign pickles
            raise SlmforgeError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
        for name, tensor in tensors.items():
            yield name, tuple(tensor.shape), tensors

    def tensor(self, name: str) -> torch.Tensor:
        source = self._where[name]
        return source[name] if isinstance(source, dict) else source.get_tensor(name)

    def __enter__(self) -> "_Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._where.clear()


def _weight_files(hf_dir: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (hf_dir / index).is_file():
            weight_map = read_json(hf_dir / index).get("weight_map") or {}
            files = [hf_dir / name for name in sorted(set(weight_map.values()))]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise SlmforgeError(f"{hf_dir / index}: names shard {missing[0].name}, which is missing")
            return files
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise SlmforgeError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
