"""How the process's C library gives freed memory back (for the nightly job's memory budget)."""

from __future__ import annotations

import ctypes
import logging

_LOGGER = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def return_freed_memory() -> bool:
    """Have glibc serve every block over 128 KiB from its own memory map, unmapped when freed.

    glibc starts there but raises the threshold to the largest block freed so far (up to 32 MiB), and
    from then on serves blocks below it from a heap it can only shrink from the top. PyTorch's
    activations and logits, freed step after step, then leave hundreds of MiB resident that nothing
    uses: a real-size night peaked about 300 MiB higher that way (benchmarks/RESULTS.md). Setting the
    threshold turns the raising off. Returns whether the C library took it (musl, for one, ignores it).
    The server does not call it: there it holds 3 % less memory but answers 4-5 % slower (RESULTS.md).
    """
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        taken = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # no mallopt in this C library
        taken = False
    _LOGGER.debug("fixed mmap threshold of %d bytes: %s", MMAP_THRESHOLD, taken)
    return taken
