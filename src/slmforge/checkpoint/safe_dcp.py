"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP stores its `.metadata` with `pickle` and non-tensor values (an optimizer's lr, betas) as
`torch.save` blobs that it reads back with `weights_only=False`: a checkpoint from someone else could
run any code when opened. Every DCP read of slmforge goes through this module instead:

- `.metadata` is unpickled by `MetadataUnpickler`, which admits only the classes torch writes there
  (DCP's metadata dataclasses and enums, torch.Size, dtypes, layouts, paths) and refuses any other
  global, so a planted `os.system` never gets called;
- byte items go through `torch.load(weights_only=True)` (plain Python values and tensors only).

Tensor data itself is read by DCP with `weights_only=True` already.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch

from slmforge.errors import SlmforgeError
from slmforge.fileio import inside

METADATA = ".metadata"

# Modules whose dataclasses and enums make up DCP's metadata (torch >= 2.5 writes these).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATH_CLASSES = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}


class UnsafeCheckpoint(SlmforgeError):
    """A checkpoint file asked to build something other than checkpoint data."""


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals DCP's `.metadata` is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            import importlib

            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif module == "torch":
            found = getattr(torch, name, None)
            if found is torch.Size or isinstance(found, (torch.dtype, torch.layout, torch.memory_format)):
                return found
        elif module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout  # looks a layout up by name in a fixed table
        elif module == "pathlib" and name in _PATH_CLASSES:
            return getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        raise UnsafeCheckpoint(f"refuses to load {module}.{name}")


def read_metadata(folder: Path):
    """The `Metadata` of a DCP folder, unpickled with `MetadataUnpickler`; one SlmforgeError naming
    the file for anything else (a damaged file, or one that asks for code)."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(folder) / METADATA
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{path}: not a checkpoint's metadata: {e} (a planted file? it was not run)") from None
    except Exception as e:  # truncated or garbled pickles raise many kinds of errors
        raise SlmforgeError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise SlmforgeError(f"{path}: holds a {type(metadata).__name__}, not a checkpoint's metadata")
    for info in (metadata.storage_data or {}).values():  # DCP opens these: none may lead out of the folder
        inside(path.parent, getattr(info, "relative_path", None), f"{METADATA} names shard file")
    if getattr(metadata, "storage_meta", None) is None:  # as DCP's own reader does
        metadata.storage_meta = StorageMeta()
    return metadata


def safe_reader(folder: Path):
    """A DCP storage reader for `folder` whose `.metadata` is read by `read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(self.path))
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


def safe_planner():
    """DCP's default load planner with its byte items read by `torch.load(weights_only=True)`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raw = value.read()
            try:  # checked first on the same bytes: DCP itself then reads them with weights_only=False
                torch.load(io.BytesIO(raw), weights_only=True)
            except Exception as e:
                raise UnsafeCheckpoint(f"item {read_item.dest_index.fqn}: refused ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}); it was not run") from None
            super().load_bytes(read_item, io.BytesIO(raw))

    return SafeLoadPlanner()


def load(content: dict[str, Any], folder: Path, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load` of `folder` into `content`, through the safe reader and
    planner (a collective under a process group unless `no_dist`)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(content, storage_reader=safe_reader(folder), planner=safe_planner(), no_dist=no_dist)
