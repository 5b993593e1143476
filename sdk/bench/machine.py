"""What machine a benchmark ran on: the CPU's ISA flags that decide which kernels are fast, and
pinning a process to cores (the device and the gateway on separate cores of one box)."""

from __future__ import annotations

import os
from pathlib import Path

# the flags that change which int8/bf16/fp32 kernels are fast
INTERESTING = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> list[str]:
    """The interesting ISA flags this CPU reports (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in INTERESTING if f in have]
    return []


def native_bf16() -> bool:
    """Whether bfloat16 matmuls run natively (AVX512-BF16 or AMX) rather than emulated."""
    flags = set(cpu_flags())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def split_cores() -> tuple[set[int], set[int]] | None:
    """(the device's cores, the gateway's cores): the usable cores split in two halves, or None
    on a machine with a single core."""
    cores = usable_cores()
    if len(cores) < 2:
        return None
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def pin(cores: set[int]) -> None:
    """Run this process on `cores` only, with as many torch threads."""
    os.sched_setaffinity(0, cores)
    try:
        import torch

        torch.set_num_threads(len(cores))
    except ImportError:  # pragma: no cover - torch is optional here
        pass


__all__ = ["cpu_flags", "native_bf16", "usable_cores", "split_cores", "pin"]
