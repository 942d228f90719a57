"""Give freed memory back to the operating system (glibc only; elsewhere nothing happens).

glibc's malloc serves a large request with its own mmap, returned on free, only above a threshold
that it *raises* each time such a block is freed (up to 32 MiB on 64-bit). After a few large
decodes, images of tens of megabytes are carved from the heap arenas of the decode threads, and
freed arena memory mostly stays with the process: in the soak benchmark the server kept about
630 MB beyond its cache after a quiet minute. Setting the threshold explicitly turns that
adjustment off, so every block of ``mmap_threshold`` bytes or more (decoded images, feature arrays,
answer bodies) goes back to the system when freed; smaller blocks are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
DEFAULT_MMAP_THRESHOLD = 1 << 20

logger = logging.getLogger("lift.service")


def return_large_blocks_to_the_system(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, mmap_threshold)``; True if glibc took it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): their allocators are left as they are
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    taken = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    logger.debug("malloc mmap threshold %d bytes: %s", mmap_threshold, "set" if taken else "refused")
    return taken
