"""An offline cache of the teacher's top-k logits at every position the student's objective scores,
so later runs train without running the teacher at all.

Which positions a sample scores, and what the teacher sees there, depend only on (seed, sample id):
masks are drawn per sample (objectives/base.py). So the cache is written once in sample order, for as
many epochs as the run needs, and read by sample id whatever the number of processes or micro-batches:

    cache/
      meta.json         k, seed, epochs, samples, the teacher, the data fingerprint, the objective
      offsets.npy       (samples + 1,) int64: sample s owns rows offsets[s]:offsets[s+1]
      ids.npy           (rows, k) int32: the teacher's k most likely tokens per scored position
      logits.npy        (rows, k) float16: their logits (at temperature 1)

At a 250k vocabulary and k = 32 a row takes 192 bytes instead of 1 MB of float32 logits. Files are
written under a temporary name and renamed when complete, so a half-written cache is never read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.objectives.base import IGNORE_INDEX

META = "meta.json"


def build_cache(out: Path, loader, objective, teacher, k: int, epochs: int, seed: int, identity: dict,
                device: torch.device, batch_size: int = 16) -> Path:
    """Run the teacher once over `epochs` passes of `loader`'s windows in sample order and keep its
    top-k logits at the positions `objective` (the student's) scores."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    samples = loader.num_windows * epochs
    offsets = np.zeros(samples + 1, dtype=np.int64)
    ids_parts, logit_parts = [], []
    covered, positions = 0.0, 0  # the teacher's probability mass inside the top-k, summed over positions
    teacher.model.eval()
    for first in range(0, samples, batch_size):
        sample_ids = np.arange(first, min(first + batch_size, samples))
        windows = sample_ids % loader.num_windows
        rows = np.stack([loader.window(int(w)) for w in windows])
        raw = {"tokens": torch.from_numpy(rows), "sample_ids": torch.from_numpy(sample_ids)}
        batch = {name: t.to(device) for name, t in objective.collate(raw, seed).items()}
        teacher_batch = dict(batch)
        if not teacher.identity:
            teacher_batch["input_ids"] = teacher.to_teacher[batch["input_ids"]]
        with torch.no_grad():
            projection, targets = objective.predictions(teacher.model, teacher_batch)
            logits = projection.logits().float().reshape(-1, projection.weight.shape[0])
            if not teacher.identity:
                logits = logits.index_select(-1, teacher.to_teacher)
            values, indices = logits.topk(k, dim=-1)
            covered += float((values.logsumexp(-1) - logits.logsumexp(-1)).exp().sum())
            positions += values.shape[0]
        per_sample = _rows_per_sample(batch, len(sample_ids))
        offsets[first + 1:first + 1 + len(sample_ids)] = per_sample
        ids_parts.append(indices.to(torch.int32).cpu().numpy())
        logit_parts.append(values.to(torch.float16).cpu().numpy())
    np.cumsum(offsets, out=offsets)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "ids.npy", np.concatenate(ids_parts))
    np.save(tmp / "logits.npy", np.concatenate(logit_parts))
    coverage = covered / max(positions, 1)
    (tmp / META).write_text(json.dumps({"k": k, "epochs": epochs, "samples": samples, "rows": int(offsets[-1]),
                                        "seed": seed, "coverage": coverage, **identity}, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _rows_per_sample(batch: dict[str, torch.Tensor], count: int) -> np.ndarray:
    """Scored positions per sample, in the order `predictions` returns them (row-major)."""
    scored = (batch["targets"] != IGNORE_INDEX).reshape(count, -1)
    return scored.sum(1).cpu().numpy()


def epochs_needed(max_steps: int, global_batch: int, grad_accum: int, windows: int) -> int:
    """Epochs a run of `max_steps` reaches: each epoch gives windows // global_batch micro-batches
    (the loader drops the remainder)."""
    per_epoch = max(windows // max(global_batch, 1), 1)
    return max(1, math.ceil(max_steps * grad_accum / per_epoch))


class TeacherCache:
    """Read side: the cached top-k of the teacher for a batch's samples."""

    def __init__(self, folder: str | Path, identity: dict, device: torch.device):
        folder = Path(folder)
        if not (folder / META).is_file():
            raise SlmforgeError(f"distill.teacher_cache: {folder} holds no cache (no {META}); build it with "
                                f"`slmforge distill -c RECIPE --build-cache`")
        self.meta = json.loads((folder / META).read_text(encoding="utf-8"))
        missing = [key for key in identity if key not in self.meta]
        if missing:
            raise SlmforgeError(f"distill.teacher_cache: {folder} was made by an older slmforge (it records no "
                                f"{missing[0]}); build it again with `--build-cache`")
        changed = [key for key, value in identity.items() if self.meta.get(key) != value]
        if changed:
            raise SlmforgeError(f"distill.teacher_cache: {folder} was built for another {', '.join(changed)}; build "
                                f"it again with `--build-cache`")
        self.offsets = np.load(folder / "offsets.npy")
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")
        self.logits = np.load(folder / "logits.npy", mmap_mode="r")
        self.k, self.device = self.meta["k"], device

    def lookup(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, k) ids, (N, k) float32 logits) for the samples' scored positions, in batch order."""
        parts = []
        for sample in sample_ids.tolist():
            if sample >= len(self.offsets) - 1:
                raise SlmforgeError(f"distill.teacher_cache: sample {sample} is beyond the {len(self.offsets) - 1} "
                                    f"cached ones (train.max_steps raised?); build the cache again")
            parts.append(slice(int(self.offsets[sample]), int(self.offsets[sample + 1])))
        ids = np.concatenate([self.ids[p] for p in parts]) if parts else np.zeros((0, self.k), np.int32)
        logits = np.concatenate([self.logits[p] for p in parts]) if parts else np.zeros((0, self.k), np.float16)
        return (torch.from_numpy(ids.astype(np.int64)).to(self.device),
                torch.from_numpy(logits.astype(np.float32)).to(self.device))


# Below this mean share of the teacher's probability inside its cached top-k, the soft targets miss
# much of what the teacher knows. Issue 23: a top-32 cache of a flat teacher made the student worse
# (hard loss 6.45 -> 7.50) where the online teacher helped.
LOW_COVERAGE = 0.8


def describe_cache(folder: Path) -> str:
    """Say what a cache holds, and warn when its top-k covers little of the teacher's probability."""
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in folder.iterdir())
    coverage = meta.get("coverage")
    covers = f", covering {coverage:.1%} of the teacher's probability" if coverage is not None else ""
    say(f"teacher cache {folder}: top-{meta['k']} at {meta['rows']:,} positions of {meta['samples']:,} samples"
        f"{covers} (mean at T = 1), {size / 2**20:,.1f} MiB")
    if coverage is not None and coverage < LOW_COVERAGE:
        say(f"warning: the teacher's top-{meta['k']} tokens hold only {coverage:.1%} of its probability on average "
            f"(below {LOW_COVERAGE:.0%}): the cached soft targets lose the rest and may make the student worse than "
            f"training alone; raise distill.top_k and build the cache again, or distill from the online teacher")
    return folder
