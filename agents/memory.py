"""The process's memory footprint, as the operating system and MLX see it."""

from __future__ import annotations

import os
import resource
import sys


def process_rss() -> tuple[int, int]:
    """(resident set bytes now, peak resident set bytes) of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = usage if sys.platform == "darwin" else usage * 1024  # macOS reports bytes, Linux kilobytes
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None
    if rss is not None:
        # Linux carries ru_maxrss over exec (a child started by a big parent inherits its peak);
        # VmHWM is this process's own high-water mark.
        try:
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
            return rss, max(rss, hwm)
        except (OSError, ValueError, StopIteration):
            return rss, max(rss, peak)
    try:
        import psutil  # optional: the current RSS on macOS and Windows

        return int(psutil.Process().memory_info().rss), peak
    except ImportError:
        return peak, peak  # only the high-water mark is known without /proc or psutil


def mlx_memory() -> tuple[int, int]:
    """(active bytes, peak bytes) of MLX's allocator; zeros where the backend does not count."""
    import mlx.core as mx

    try:
        return int(mx.get_active_memory()), int(mx.get_peak_memory())
    except AttributeError:  # older MLX names these under mx.metal
        return int(mx.metal.get_active_memory()), int(mx.metal.get_peak_memory())
