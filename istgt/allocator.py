"""glibc malloc settings for a process that moves large I/O buffers.

Every READ answer, and every WRITE buffer, is an allocation of the transfer size. glibc
serves sizes above its mmap threshold with a fresh mmap each time (the threshold only rises
to the size just freed, and an equal size is still mapped), so each 1 MiB command paid for
page faults and zeroing of new pages: 1 MiB reads 1.1x and writes 1.4x faster without that
(bench/, same run). Buffers up to MMAP_THRESHOLD now come from the heap and are reused; free
heap above TRIM_THRESHOLD is returned to the system and at most ARENA_MAX arenas keep any.
Free pages inside the heap are only given back by malloc_trim, which the server calls every
TRIM_INTERVAL_S (bench/memory_run.py: without it the resident size crept up run after run).
Settings given in the environment (MALLOC_*_) win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("istgt")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8     # <malloc.h>
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024
ARENA_MAX = 2
TRIM_INTERVAL_S = 5.0

_libc = None        # set by tune() when glibc is there

_SETTINGS = (
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
)


def tune(environ=os.environ) -> list[str]:
    """Apply the settings (before threads start: arenas are per thread); returns the names
    of those applied. Without glibc nothing changes."""
    global _libc
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return []
    _libc = libc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = []
    for env_name, option, value in _SETTINGS:
        if env_name in environ:
            continue
        if mallopt(option, value) == 1:
            applied.append(env_name)
        else:
            log.debug("mallopt(%d, %d) refused", option, value)
    return applied


def trim() -> bool:
    """Give free heap pages back to the system (glibc malloc_trim); False without glibc."""
    libc = _libc
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
