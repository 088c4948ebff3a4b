"""Giving freed heap memory back to the operating system after a pass that streamed many batches.

glibc's malloc keeps memory freed by short-lived buffers (Ray Data batches converted to numpy, per-block
results) in its arenas, so a driver's resident size keeps the high-water mark of every pass it ran and grows
with the number of rows streamed through it; Arrow's own pool does the same with what Arrow tables and Parquet
reads freed. ``release_unused`` and ``malloc_trim(0)`` return those free pages (the latter only with glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """Return free heap pages to the OS: Arrow's memory pool (mimalloc or jemalloc keep what Arrow tables and
    Parquet I/O freed) and glibc's heap. True when glibc released something."""
    import gc
    import sys

    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
