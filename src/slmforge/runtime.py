"""Where and in what precision to run: the only place that inspects the hardware."""

from __future__ import annotations

from pathlib import Path

import torch

from slmforge.errors import ConfigError
from slmforge.formatting import say


def resolve_device(name: str = "auto", field: str = "train.device") -> torch.device:
    """The device `name` asks for; errors name `field`, the config field or flag it came from."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{field}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{field}: {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{field}: {name!r} requested but MPS is not available")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 autocast where the GPU supports it, else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name  # bf16 on CPU is honoured (CPU autocast supports it), though usually slower than fp32


def apply_attention(model: torch.nn.Module, name: str, device: torch.device) -> None:
    """train.attention: the attention kernel of a decoder's training passes (`Decoder.set_attention`).
    torch 2.13 refuses FlexAttention's backward pass on CPU and MPS (flex_attention._validate_device),
    so there this says so and training keeps SDPA."""
    if name == "sdpa":
        return
    if not hasattr(model, "set_attention"):
        raise ConfigError(f"train.attention: {name} is implemented for decoders, not {type(model).__name__}; "
                          f"use sdpa")
    try:  # the model's own refusals first, so a config is judged the same on every device
        model.set_attention(name)
    except ValueError as error:
        raise ConfigError(f"train.attention: {error}") from None
    if device.type in ("cpu", "mps"):
        model.set_attention("sdpa")
        say(f"warning: train.attention={name}: torch {torch.__version__} has no FlexAttention backward pass on "
            f"{device.type}; training with sdpa (the same numbers)")


# Dense bf16 tensor-core peak FLOP/s per device, from the vendors' datasheets (no sparsity): what MFU
# divides by. A device not listed gets no MFU rather than a guessed one.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12,
                   "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, if it is a GPU this table knows."""
    if device.type != "cuda":
        return None
    import re

    name = torch.cuda.get_device_name(device)
    # The first key that stands as whole words in the name (L4 is not L40S; H100 PCIe before H100).
    return next((flops for key, flops in PEAK_BF16_FLOPS.items()
                 if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", name)), None)


def describe(device: torch.device, precision: str, processes: int) -> dict:
    """Hardware and versions a run records in meta.json (shown by `slmforge report`)."""
    import os
    import platform

    import slmforge

    hardware = {"device": str(device), "precision": precision, "processes": processes,
                "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1)})
    versions = {"slmforge": slmforge.__version__, "torch": torch.__version__,
                "python": platform.python_version(), "cuda": torch.version.cuda}
    return {"hardware": hardware, "versions": versions}


def cpu_threads_for_training(processes_here: int = 1) -> int:
    """Intra-op threads for CPU training: the cores not kept busy by other processes, shared among
    this machine's training processes, unless OMP_NUM_THREADS says. Sets torch's and says why.

    torch takes every core by default, and its threads wait on each other at every op: with one core
    taken by another process, the quickstart's 60 steps took 140-186 s on 2 threads against 28 s on 1
    (issue 23). Alone, 2 threads were faster (109 s against 193 s for the whole quickstart)."""
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = others_busy_cores()
    threads = max(1, (cores - round(busy if busy is not None else 0.0)) // max(processes_here, 1))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    load = f"other processes keep {busy:.1f} busy" if busy is not None else "their load unknown"
    say(f"CPU: {threads} thread{'s' * (threads > 1)} per process ({cores} cores, {load}; OMP_NUM_THREADS=N "
        f"to choose)")
    return threads


def others_busy_cores(seconds: float = 0.3) -> float | None:
    """How many cores other processes keep busy, measured over `seconds`: the machine's busy time
    (/proc/stat) minus this process's own CPU time. None where /proc/stat does not exist."""
    import os
    import time
    from pathlib import Path

    def busy_seconds() -> float:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait

    try:
        start, own, wall = busy_seconds(), time.process_time(), time.monotonic()
        time.sleep(seconds)
        busy = busy_seconds() - start - (time.process_time() - own)
        return max(0.0, busy / (time.monotonic() - wall))
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> int | None:
    """Bytes this process may allocate: the system's MemAvailable, capped by a cgroup (container) memory
    limit when there is one; None when neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # cgroup v1 writes "no limit" as a huge number
                found.append(int(limit))
        except (OSError, ValueError):
            pass
    return min(found) if found else None
