"""FSDP2 builds on the meta device, shards, then materialises and seeds only each rank's shard
(train/parallel.py, build_for_strategy): the gathered weights equal one process's build with the same
seed, and no rank ever holds the whole model (measured: the process's heap in use, sampled around
every torch operation of the build)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from slmforge.errors import SlmforgeError
from slmforge.models import build_model, config_from_dict
from slmforge.objectives.base import TrainingHooks
from slmforge.train.parallel import ObjectiveModule, ParallelConfig, build_for_strategy, wrap

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# Every family's init code: decoders (Llama with an untied head; Gemma 3's unit-offset norms), an encoder
# (its init walks modules: biases and LayerNorms), an encoder-decoder with T5's per-matrix scales.
MODELS = {
    "llama": {"preset": "test-tiny", "tie_embeddings": False},
    "gemma3": {"preset": "gemma3-tiny", "vocab_size": 96, "num_layers": 2},
    "bert": {"preset": "bert-tiny", "vocab_size": 96},
    "t5": {"preset": "t5-tiny", "vocab_size": 96},
}
# For the memory figure: 15 MiB of weights, so the heap's other traffic is noise beside them, and no
# single tensor large beside the model (1 MiB at most), so a rank's half stands out from the one
# parameter drawn whole at a time.
WIDE = {"preset": "test-tiny", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 1024, "num_layers": 4}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_reader():
    """A function giving glibc's bytes in use (malloc'd, mmapped blocks included: where CPU tensors
    live), or None without glibc >= 2.33."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class PeakHeap(TorchDispatchMode):
    """The most heap in use, above where it stood at the start, seen around any torch operation."""

    def __init__(self, read):
        super().__init__()
        self.read, self.start = read, read()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.peak = max(self.peak, self.read() - self.start)
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.read() - self.start)
        return out


def _build(cfg: dict, strategy: str, seed: int | None, weights_from: Path | None = None):
    """A model built for `strategy` and wrapped as training wraps it; the heap's peak during both."""
    model_cfg = config_from_dict(cfg)
    read = _heap_reader()
    meter = PeakHeap(read) if read else None
    with meter or nullcontext():
        model = build_for_strategy(model_cfg, torch.device("cpu"), strategy, seed, weights_from)
        module = wrap(ObjectiveModule(model, TrainingHooks()), strategy, torch.device("cpu"), ParallelConfig())
    return model, module, (meter.peak if meter else None)


def _rank(rank: int, world: int, rendezvous: str, jobs: list, out: str) -> None:
    """Build each job's (config, seed, weights_from) under FSDP2; rank 0 saves the gathered weights and
    buffers, every rank its memory figures."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        for index, (cfg, seed, weights_from) in enumerate(jobs):
            model, _, peak = _build(cfg, "fsdp", seed, weights_from)
            assert all(p.device.type == "cpu" for p in model.parameters())
            local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
            full = {name: p.full_tensor() for name, p in model.named_parameters()}  # a collective
            if rank == 0:
                buffers = {f"buffer.{n}": b.clone() for n, b in model.named_buffers()}
                save_file({**full, **buffers}, f"{out}/weights-{index}.safetensors")
            save_file({"local": torch.tensor(local), "peak": torch.tensor(-1 if peak is None else peak)},
                      f"{out}/memory-{index}-{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_builds(tmp_path_factory):
    """Every model of MODELS seeded with 7, the llama one again from a checkpoint (train.init_from),
    then WIDE (measured last, after the first builds did their imports and filled torch's caches),
    each built by 2 gloo processes: name -> (gathered weights and buffers, each rank's memory)."""
    from slmforge.checkpoint.writing import save_checkpoint

    out = tmp_path_factory.mktemp("fsdp")
    source = save_checkpoint(out / "source", 1, build_model(config_from_dict(MODELS["llama"]), seed=3))
    jobs = {**{name: (cfg, 7, None) for name, cfg in MODELS.items()},
            "init_from": (MODELS["llama"], 0, source), "wide": (WIDE, 0, None)}
    mp.spawn(_rank, args=(2, str(out / "rendezvous"), list(jobs.values()), str(out)), nprocs=2)
    return {name: (load_file(out / f"weights-{i}.safetensors"),
                   [load_file(out / f"memory-{i}-{rank}.safetensors") for rank in range(2)])
            for i, name in enumerate(jobs)}


def assert_same_model(weights: dict, model: torch.nn.Module) -> None:
    expected = {**dict(model.named_parameters()), **{f"buffer.{n}": b for n, b in model.named_buffers()}}
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor.detach(), atol=0, rtol=0, msg=name)  # bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp2_seeds_each_shard_with_the_values_one_process_draws(name, fsdp_builds):
    weights, _ = fsdp_builds[name]
    assert_same_model(weights, build_model(config_from_dict(MODELS[name]), seed=7))


@pytest.mark.slow
def test_fsdp2_loads_init_from_weights_into_its_shards(fsdp_builds):
    weights, _ = fsdp_builds["init_from"]
    assert_same_model(weights, build_model(config_from_dict(MODELS["llama"]), seed=3))


@pytest.mark.slow
def test_no_rank_holds_the_whole_model(fsdp_builds):
    """Peak heap in use while building + sharding + seeding, per rank, against one process's build."""
    weights, memory = fsdp_builds["wide"]
    _build(MODELS["llama"], "none", seed=0)  # the same warm-up as the ranks had
    one, _, one_peak = _build(WIDE, "none", seed=0)
    assert_same_model(weights, one)
    full = sum(p.numel() * p.element_size() for p in one.parameters())
    for rank in range(2):
        assert memory[rank]["local"].item() <= 0.51 * full  # the shard: half, plus rounding
    if one_peak is None:
        pytest.skip("no glibc mallinfo2 here to measure the heap")
    peaks = [memory[rank]["peak"].item() for rank in range(2)]
    print(f"peak heap during the build: one process {one_peak / 2**20:.2f} MiB, model {full / 2**20:.2f} MiB; "
          f"2 FSDP2 ranks {peaks[0] / 2**20:.2f} / {peaks[1] / 2**20:.2f} MiB "
          f"(ratio {max(peaks) / one_peak:.2f})")
    assert one_peak >= full  # the meter sees the whole model being built on one process
    assert max(peaks) < 0.75 * one_peak


def test_a_meta_built_model_is_refused_by_another_strategy():
    model = build_for_strategy(config_from_dict(MODELS["llama"]), torch.device("cpu"), "fsdp", seed=0)
    with pytest.raises(SlmforgeError, match="meta device"):
        wrap(ObjectiveModule(model, TrainingHooks()), "ddp", torch.device("cpu"), ParallelConfig())


def test_other_strategies_build_as_before(tmp_path):
    from slmforge.checkpoint.writing import save_checkpoint

    cfg = config_from_dict(MODELS["llama"])
    source = save_checkpoint(tmp_path / "source", 1, build_model(cfg, seed=3))
    for strategy in ("none", "ddp"):
        model = build_for_strategy(cfg, torch.device("cpu"), strategy, seed=5)
        assert_same_model({**dict(model.named_parameters()),
                           **{f"buffer.{n}": b for n, b in model.named_buffers()}}, build_model(cfg, seed=5))
        loaded = build_for_strategy(cfg, torch.device("cpu"), strategy, seed=5, weights_from=source)
        assert_same_model({**dict(loaded.named_parameters()),
                           **{f"buffer.{n}": b for n, b in loaded.named_buffers()}}, build_model(cfg, seed=3))
