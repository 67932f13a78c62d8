"""Timing for every benchmark: run statistics, timed runs, and two sides timed in alternating rounds."""

from __future__ import annotations

import statistics
import time


def summary(seconds: list[float]) -> dict:
    """Median, min and max of a list of run times, and how many runs."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": len(seconds)}


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median of each round's ratio ours/theirs: robust to other processes slowing a whole round."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def timed(fn, repeat: int = 3, before=None) -> dict:
    """summary() of fn() over `repeat` runs (before() runs untimed first each time)."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


def timed_pair(ours, theirs, repeat: int = 3, before=None) -> tuple[dict, dict]:
    """timed() of two functions run in alternating rounds, which one goes first alternating too: on a
    busy machine both sides see the same background load, so their ratio stays meaningful.

    Each side also reports its median count of minor page faults per run: on a virtual machine a
    fault costs microseconds, so a side that was handed fresh memory shows it there, not in its code.
    """
    times: tuple[list[float], list[float]] = ([], [])
    faults: tuple[list[int], list[int]] = ([], [])
    for i in range(repeat):
        sides = ((ours, times[0], faults[0]), (theirs, times[1], faults[1]))
        for fn, out, flt in sides if i % 2 == 0 else sides[::-1]:
            if before:
                before()
            f0 = minor_faults()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            flt.append(minor_faults() - f0)
    return tuple({**summary(t), "page_faults": int(statistics.median(f))} for t, f in zip(times, faults))


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage does not exist)."""
    try:
        import resource
    except ImportError:  # not on Unix: no counts
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
