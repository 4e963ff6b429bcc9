"""Peak resident memory of a call, for the "no widget value runs the machine out of memory" tests."""
from __future__ import annotations

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
    it. Memory the allocator already holds and reuses does not count, so keep
    the inputs' own allocations out of ``fn`` and compare against a bound well
    below what a broken implementation allocates.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - base) * 1024
