"""Process memory housekeeping."""

from __future__ import annotations

import ctypes
import sys


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
