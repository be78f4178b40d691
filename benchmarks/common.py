"""Timing, memory, hardware rate and the report shared by every measurement."""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Row:
    """One line of the report: a metric of slmforge beside the same metric of the baseline."""

    measurement: str
    """training, decoding, loss or data."""
    case: str
    """Shape and setting, e.g. `gemma3-270m vocab 262,144, B 16 x T 1024, bf16`."""
    metric: str
    """What the numbers are, with the unit (tokens/s, peak MiB, MFU %, MB/s, s)."""
    slmforge: float | None
    baseline: float | None
    baseline_name: str
    higher_is_better: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """slmforge / baseline, as the issue asks (for memory and time, lower is better)."""
        if self.slmforge is None or not self.baseline:
            return None
        return self.slmforge / self.baseline

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def interleave(sides: dict[str, Callable[[], object]], rounds: int, device: torch.device,
               warmup: int = 1, cpu_clock: Callable[[], float] = time.process_time) -> dict[str, Timing]:
    """Run each side's callable `rounds` times, alternating sides (and which goes first) so that a burst
    of load from elsewhere hits both alike. Returns wall and process-CPU seconds per round (CPU time
    counts every thread; on CUDA only the host's share; `cpu_clock` = `cpu_seconds` adds finished
    child processes, e.g. worker pools)."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    synchronize(device)
    timings = {name: Timing([], []) for name in sides}
    names = list(sides)
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            synchronize(device)
            wall, cpu = time.perf_counter(), cpu_clock()
            sides[name]()
            synchronize(device)
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(cpu_clock() - cpu)
    return timings


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have finished (worker pools, once joined)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timing_note(timings: dict[str, Timing], per: float = 1.0, unit: str = "s") -> str:
    """`name: wall x, cpu y (rounds a, b, c)` per side, per `per` units of work."""
    parts = []
    for name, t in timings.items():
        rounds = ", ".join(f"{w / per:.3g}" for w in t.wall)
        parts.append(f"{name} {t.median_wall / per:.3g} {unit} wall, {t.median_cpu / per:.3g} {unit} cpu "
                     f"(rounds {rounds})")
    return "; ".join(parts)


# ---------------------------------------------------------------- peak memory


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator while `fn` runs, above what was live before: the
    profiler's memory events (every allocation and free, with its size) summed in time order. The CPU
    counterpart of torch.cuda.max_memory_allocated: tensor memory, not RSS (which the C library's
    caching and other threads blur)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Memory `fn` adds at its peak over what was live before, in MiB: CUDA max_memory_allocated (PyTorch's
    cache not counted), or on CPU the same quantity from the profiler's allocation events."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _cpu_peak_bytes(fn) / 2**20


# ---------------------------------------------------------------- hardware


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a square (size x size) matmul in `dtype` on `device`: the "peak" MFU is
    measured against, taken in the same run as the training it judges (not a datasheet number)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def environment(device: torch.device) -> dict:
    import platform

    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()[0]
    return info
