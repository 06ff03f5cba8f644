"""Process memory housekeeping."""

from __future__ import annotations

import ctypes
import sys

import torch


def return_freed_memory() -> None:
    """Hands freed heap pages back to the OS.

    glibc keeps the pages of freed large temporaries (a loader's copies, the separate weights a
    fusion replaced) resident, so they would count in the process's memory, and in every
    tensor-parallel rank's peak, until reused. A no-op where malloc_trim does not exist.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory a new allocation could take now: free memory of a CUDA device, MemAvailable of the
    machine (Linux) for the CPU; None when unknown."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
