"""Keep freed sample buffers in the process instead of handing them back to the OS after each sample.

A sample's pixel arrays are several MB each. glibc serves allocations that large with fresh `mmap`
pages and returns them on free, so every sample page-faults (and the kernel zeroes) its buffers anew:
on 448x448 images that was ~35% of the per-sample time (12.7 -> 8.2 ms, `vltune bench data`). Raising
the mmap and trim thresholds, as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` would, makes
glibc reuse the freed blocks. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 256 << 20  # at most this much freed memory is kept back from the OS
_done = False


def reuse_freed_buffers() -> bool:
    """Set glibc's thresholds once per process; True when they were set."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _done
