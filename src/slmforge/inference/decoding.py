"""The pieces of one decoding step that do not depend on the batch: CPU threads for small steps, and
the fixed-shape step that `compile` compiles (issue 17)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from slmforge.models import KVCache

# CPU decoding of a small model is a chain of tiny matmuls: with several intra-op threads every op pays
# to wake and join them, and on shared cores one descheduled thread stalls every op. Issue 17 measured
# the same llama-tiny run at 0.13 s with 1 thread and 7.8 s with 2 on 2 busy cores (and 0.66 s vs 37 s).
# Below this many FLOPs per decoding step one thread is used; above it torch's default (all cores).
# Measured only on 2 shared cores, where one thread won up to ~27 MFLOP a step (gemma3-tiny, batch 8);
# the bound is kept low so that mid-size models (30M+ parameters) keep every core on a quiet machine.
SINGLE_THREAD_STEP_FLOPS = 64e6


def decode_threads(model, batch_size: int, device: torch.device) -> int:
    """Intra-op threads for decoding on `device`: 1 on CPU when one step (2 FLOPs per parameter per row,
    the output layer included) is below SINGLE_THREAD_STEP_FLOPS, else torch's current setting."""
    if device.type != "cpu":
        return torch.get_num_threads()
    step_flops = 2 * batch_size * model.cfg.num_parameters()
    return 1 if step_flops < SINGLE_THREAD_STEP_FLOPS else torch.get_num_threads()


@contextmanager
def cpu_threads(threads: int | None):
    """torch.set_num_threads(threads) for the duration, restored after (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def static_step(model, input_ids: torch.Tensor, cache: KVCache, position: torch.Tensor,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits (B, V) for one new token per row (B, 1): the function torch.compile traces."""
    return model.logits(model.decode_step(input_ids, cache, position, key_padding)[:, -1])


def compiled_static_step(device_type: str) -> Callable:
    """`static_step` compiled for `device_type`; an engine asks once and keeps it (dynamo keeps one graph
    per model and shape set, process-wide). On CUDA, mode reduce-overhead replays the step as CUDA
    graphs: decoding a small model on a GPU is bound by kernel launches, not FLOPs. On CPU inductor's
    default mode fuses the elementwise work and drops most per-op Python overhead. fullgraph: a graph
    break is an error, never a silent half-compiled step."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(static_step, mode=mode, fullgraph=True)
