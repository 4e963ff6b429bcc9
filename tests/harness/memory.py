"""Peak resident memory of a call, for the "no widget value runs the machine out of memory" tests."""
from __future__ import annotations

import ctypes
import gc
import re
from typing import Callable, Tuple, TypeVar

T = TypeVar("T")
GiB = 2 ** 30


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M).group(1))


def peak_rss_growth(fn: Callable[[], T]) -> Tuple[T, int]:
    """Run ``fn()`` and return its result and the peak growth of this process's resident memory (bytes).

    The kernel's high-water mark (``VmHWM``) is reset to the current RSS first
    (writing 5 to ``/proc/self/clear_refs``, Linux >= 4.0), so the figure is
    exact (no sampling gaps) and earlier peaks of the test session do not hide
    it. Memory glibc's heap kept from earlier tests would be reused without
    growing the RSS and hide allocations, so during the call every block of
    1 MiB or more is mapped on its own (``mallopt``), the heap is trimmed
    first, and glibc's usual dynamic threshold (at most 32 MiB) is set after.
    Keep the inputs' own allocations out of ``fn``.
    """
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, 2 ** 20)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS")
        result = fn()
        return result, (_status_kib("VmHWM") - base) * 1024
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)


_M_MMAP_THRESHOLD = -3  # glibc malloc.h
