"""Timing helper shared by the benchmarks (run them as ``python bench/<name>.py``)."""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``fn``: the median of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def peak_rss_growth_kib(fn: Callable[[], object]) -> int:
    """Peak growth of this process's resident memory (KiB) while ``fn()`` runs.

    A thread samples the RSS every millisecond (torch ops release the GIL); the
    baseline is the RSS just before the call, so memory spikes of the setup
    (which would hide it from ``ru_maxrss``) do not count. Run it in a fresh
    process for a cold figure.
    """
    base = _rss_kib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_kib()) - base
