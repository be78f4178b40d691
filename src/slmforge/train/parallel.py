"""Parallelism from outside the model: process groups from torchrun or SLURM, and the wrapping.

The model never sees a rank or a device. Training wraps the (model, objective) pair in one module whose
forward computes the loss, so every parameter use (the tied output embedding included) happens inside
a forward that DDP and FSDP2 see, then:

    none   one process
    ddp    DistributedDataParallel: every rank holds the whole model, gradients are averaged
    fsdp   FSDP2 `fully_shard` per block, then the root: parameters, gradients and optimizer state are
           sharded across ranks (worth it when the model + AdamW state crowd a GPU)

DDP and single-process runs build the model whole. FSDP2 runs that start from a seed or resume build
it on the meta device (`build_for_strategy`), shard it, and only then materialise each rank's shard:
seeded with the very values one process draws, or left for the resumed checkpoint to fill, so no rank
ever holds the whole model.

Launch with `torchrun --nproc-per-node N -m slmforge pretrain ...` or under SLURM with `srun`; rank,
world size and local rank come from either environment. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from slmforge.checkpoint.reading import load_weights
from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.models import ModelConfig, build_model
from slmforge.train.signals import waiting_in_torch


@dataclass
class ParallelConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """How the model spreads over processes: auto = ddp when launched with several, else none."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: auto = nccl on CUDA, gloo on CPU."""
    timeout_minutes: float = 60.0
    """How long a collective may wait (e.g. ranks waiting while rank 0 writes a large checkpoint)."""
    connect_timeout_seconds: float = 300.0
    """How long a process waits at the start for the rendezvous (MASTER_ADDR:MASTER_PORT) and for every
    other process to join, before it stops in one line (a launcher that died, a rank that never
    started); separate from timeout_minutes, which bounds collectives once the run is going."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~30% more compute)."""
    checkpoint: Literal["auto", "sharded", "full"] = "auto"
    """FSDP2 checkpoints: sharded = every rank writes its shard with torch.distributed.checkpoint (nothing
    gathered on one rank; resumes on any number of processes); full = rank 0 gathers one
    model.safetensors. auto = sharded under fsdp. DDP and single-process runs always write full ones."""
    async_checkpoint: bool = False
    """Sharded checkpoints: copy to CPU memory at the step boundary, then write in a background thread
    while training goes on."""

    def validate(self) -> None:
        require(self.timeout_minutes > 0, "timeout_minutes", f"must be positive, got {self.timeout_minutes}")
        require(self.connect_timeout_seconds > 0, "connect_timeout_seconds",
                f"must be positive, got {self.connect_timeout_seconds}")
        require(not (self.async_checkpoint and self.checkpoint == "full"), "async_checkpoint",
                "applies to sharded checkpoints; set parallel.checkpoint = \"sharded\" (or \"auto\" with fsdp)")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def environment() -> Distributed:
    """Rank, world size and local rank from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); one process when neither is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Distributed(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return Distributed(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Distributed()


def init_distributed(cfg: ParallelConfig, device: torch.device) -> Distributed:
    """Join the process group when launched with several processes; returns where this one stands."""
    where = environment()
    if not where.active or dist.is_initialized():
        return where
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise SlmforgeError("parallel: several processes but MASTER_ADDR / MASTER_PORT are not set; launch with "
                            "torchrun, or export them in the SLURM batch script (see the README)")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    os.environ.setdefault("RANK", str(where.rank))  # SLURM: the env:// rendezvous reads these
    os.environ.setdefault("WORLD_SIZE", str(where.world_size))
    kwargs = {"device_id": device} if backend == "nccl" else {}
    _join(backend, where, cfg, kwargs)
    return where


def _join(backend: str, where: Distributed, cfg: ParallelConfig, kwargs: dict) -> None:
    """init_process_group with two timeouts: parallel.connect_timeout_seconds to reach the rendezvous
    and for every rank to join (torch would wait timeout_minutes, an hour, for a launcher that is
    gone), then parallel.timeout_minutes for the collectives of the run."""
    host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    connect = timedelta(seconds=cfg.connect_timeout_seconds)
    collective = timedelta(minutes=cfg.timeout_minutes)
    retime = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.4
    _refuse_a_gone_launcher(host, port, where)
    try:
        with waiting_in_torch(), held_stderr():
            store, _, _ = next(dist.rendezvous("env://", where.rank, where.world_size, timeout=connect))
            store.set_timeout(connect)
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=where.rank,
                                    world_size=where.world_size, timeout=connect if retime else collective,
                                    **kwargs)
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError / DistStoreError, gloo's own
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise SlmforgeError(f"parallel: rank {where.rank} of {where.world_size} could not join the others at "
                            f"{host}:{port} ({reason[:200]}); was every process started, and is the launcher "
                            f"(torchrun) or rank 0 still running? parallel.connect_timeout_seconds "
                            f"({cfg.connect_timeout_seconds:g}) bounds the wait") from None
    store.set_timeout(collective)  # the store also serves the run (e.g. NCCL communicators made later)
    if retime:
        retime(collective)


def _refuse_a_gone_launcher(host: str, port: str, where: Distributed) -> None:
    """Under torchrun the launcher's store is listening before any worker starts: a refused connection
    means the launcher has exited; say so at once rather than retry for connect_timeout_seconds."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return  # rank 0 hosts the store (srun, by hand): it may simply not have started yet
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except ConnectionRefusedError:
        raise SlmforgeError(f"parallel: rank {where.rank}: nothing listens at {host}:{port}, where torchrun's "
                            f"rendezvous should be; the launcher has exited, start the job again") from None
    except (OSError, ValueError):
        return  # unreachable or slow: the rendezvous reports it after connect_timeout_seconds


@contextmanager
def held_stderr():
    """Hold what C++ writes to fd 2 during the block (torch logs every failed connection try with a
    stack trace): written out afterwards when the block succeeds, dropped when it fails, whose error
    says it in one line."""
    fd = 2
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            if ok:
                held.seek(0)
                with os.fdopen(os.dup(fd), "wb") as out:
                    out.write(held.read())


def local_device(device: torch.device, where: Distributed) -> torch.device:
    """One GPU per process: cuda becomes cuda:local_rank when launched with several processes (call it
    before init_distributed: NCCL binds each process to its device when the group is made)."""
    if device.type == "cuda" and where.active:
        if device.index is not None:
            raise SlmforgeError(f"train.device: {device} would put every process on one GPU; use 'cuda' (or auto) "
                                f"and each process takes the GPU of its local rank")
        torch.cuda.set_device(where.local_rank)
        return torch.device("cuda", where.local_rank)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ObjectiveModule(nn.Module):
    """model + objective as one module whose forward returns (loss, metrics): the unit DDP and FSDP2
    wrap, so the loss (and the output head inside it) runs inside their forward."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective
        # Parameters an objective trains beside the model (distillation's hidden-state projection)
        # are registered here, so DDP averages their gradients too.
        extra = objective_parameters(objective)
        if extra is not None:
            self.objective_module = extra

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.objective.loss(self.model, batch)


def objective_parameters(objective) -> nn.Module | None:
    """The module of parameters `objective` trains beside the model, if it has any."""
    return objective.trainable_module()


def strategy_for(cfg: ParallelConfig, where: Distributed) -> str:
    if cfg.strategy == "auto":
        return "ddp" if where.active else "none"
    if cfg.strategy != "none" and not where.active:
        return "none"  # one process: nothing to spread
    return cfg.strategy


def wrap(module: ObjectiveModule, strategy: str, device: torch.device, cfg: ParallelConfig,
         precision: str = "fp32", compile: bool | str = False) -> nn.Module:
    """Apply activation checkpointing, torch.compile (`train.compile`) and the parallel wrapper to a
    materialised ObjectiveModule, or (fsdp) one that build_for_strategy left on the meta device, whose
    shards are materialised and filled once it is sharded."""
    pending = isinstance(getattr(module.model, PENDING, None), PendingWeights)
    if pending != (strategy == "fsdp") and any(p.is_meta for p in module.parameters()):
        raise SlmforgeError(f"parallel.strategy: the model is still on the meta device under {strategy!r}; build "
                            f"it with build_for_strategy(..., strategy={strategy!r}), which fills what it builds")
    if cfg.activation_checkpointing:
        checkpoint_blocks(module.model)
    compile_for_training(module, compile, strategy)
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute, fp32 gradient reduction and master weights (the optimizer steps in fp32).
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        for block in module.model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(module, mp_policy=policy)  # the root: embeddings, norms and the head, with the loss
        if pending:
            materialize_shards(module.model)
    return module


# ---------------------------------------------------------------- building for a strategy

PENDING = "pending_weights"
"""The attribute of a meta-built model that says what fills it once sharded (set and removed here)."""


@dataclass(frozen=True)
class PendingWeights:
    """What an FSDP2 model built on the meta device gets once `wrap` has sharded it."""

    device: torch.device
    seed: int | None
    """Initialise from this seed (the values one process draws); None: the resumed checkpoint fills it."""


def build_for_strategy(cfg: ModelConfig, device: torch.device, strategy: str, seed: int | None,
                       weights_from: Path | None = None) -> nn.Module:
    """The model a run of `strategy` (strategy_for's answer) starts from: the weights of the checkpoint
    folder `weights_from` (train.init_from), else seeded with `seed`, else (both None) left for a
    resume to fill.

    fsdp, seeded or resuming: built on the meta device and filled by `wrap` after fully_shard, so each
    rank materialises only its shard (DESIGN.md: build on meta -> parallelize -> materialize -> init,
    as torchtitan does). Otherwise built whole on `device` now, as always under ddp and none; so too
    under fsdp from `weights_from`, which every rank reads whole anyway, and which a verb may still
    change before sharding (finetune grows the embedding for added tokens)."""
    if strategy == "fsdp" and weights_from is None:
        model = build_model(cfg, device="meta")
        setattr(model, PENDING, PendingWeights(device, seed))
        return model
    model = build_model(cfg, device=device, seed=None if weights_from is not None else seed)
    if weights_from is not None:
        load_weights(model, weights_from)
    return model


@torch.no_grad()
def materialize_shards(model: nn.Module) -> None:
    """Allocate this rank's shard of every parameter of a sharded meta model, then fill it.

    Seeded init runs the model's own `init_weights` on the sharded parameters: it draws each full
    parameter in turn from the one generator stream it uses on one process, and under implicit
    replication `copy_` keeps this rank's rows. So the weights equal one process's bit for bit, with
    one full parameter in memory at a time, never the model. (torchtitan's DTensor random ops draw
    each shard separately instead: cheaper, but not the single-process values.)"""
    pending: PendingWeights = getattr(model, PENDING)
    delattr(model, PENDING)
    model.to_empty(device=pending.device)
    model.reset_buffers()  # FSDP2 leaves buffers whole: RoPE frequencies are computed on every rank
    if pending.seed is not None:  # (None: the Trainer's resume loads the checkpoint into the shards)
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():  # a plain full tensor acts as a replicated one: copy_ keeps the shard
            model.init_weights(pending.seed)


def compile_for_training(module: ObjectiveModule, scope: bool | str, strategy: str) -> None:
    """Compile in place, so state_dict names stay free of `_orig_mod.`: each block ("blocks", true), or
    the ObjectiveModule's forward, the model and its loss as one graph ("model"; the step traces with
    no graph break with SDPA, see tests/test_compile.py; train.attention = "flex" builds its block masks
    outside the graph: one break). Before DDP or FSDP2 wrap it, as torchtitan does."""
    if not scope:
        return
    if scope == "model":
        if strategy == "fsdp":
            raise SlmforgeError('train.compile: "model" cannot be combined with parallel.strategy = "fsdp" '
                                '(FSDP2 gathers each block in turn); use train.compile = "blocks"')
        module.compile()
        return
    for block in module.model.layers:
        block.compile()


def is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")  # what fully_shard adds


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block in backward instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward

        def recomputed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed


@contextmanager
def no_gradient_sync(module: nn.Module, skip: bool):
    """DDP: accumulate micro-batch gradients locally and all-reduce only on the last one."""
    if skip and isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif is_sharded(module):  # FSDP2: reduce-scatter gradients only after the last micro-batch
        module.set_requires_gradient_sync(not skip)
        yield
    else:
        yield


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (e.g. one rank got Ctrl-C)."""
    return any_rank_each([flag], device)[0]


def any_rank_each(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank when it is True on any, in one collective."""
    if not dist.is_initialized():
        return list(flags)
    values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_objects(objects: list) -> None:
    """Replace `objects` (a list, in place) on every rank by rank 0's (a no-op alone)."""
    if dist.is_initialized():
        dist.broadcast_object_list(objects, src=0)


def gather_objects(obj):
    """Every rank's `obj`, as a list on every rank (one element when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
