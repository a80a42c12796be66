"""This process's memory, as the operating system reports it."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes() -> int:
    """Memory the system can give without swapping (Linux ``MemAvailable``; else the
    free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Hand memory the process has freed back to the operating system (glibc's
    ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks of its heaps for reuse; after a block of a model is
    quantized and dropped, the holes its temporaries left would otherwise stay
    resident and grow with every block (measured on smollm2-135m: peak 1.76 GB
    without, 1.46 GB with a trim after each block, at the same speed).
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
