"""The benchmarks' environment: page-cache and memory control, durable writes, and the machine's description.

Synthetic caches come from `kvstore.testing`, timing from `benchmarks.timing`, output from `benchmarks.report`."""

from __future__ import annotations

import os
import platform
import subprocess

import mlx.core as mx

from kvstore.cache.leaves import arrays_of


def eval_cache(cache: list) -> None:
    mx.eval(arrays_of(cache))


def drop_page_cache() -> bool:
    """Empty the OS page cache (root on Linux); False where that is not possible."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        try:  # macOS
            subprocess.run(["purge"], check=True, capture_output=True)
            return True
        except (OSError, subprocess.CalledProcessError):
            return False


def touch_memory(gib: float = 6.0) -> None:
    """Write, then free, `gib` GiB once before timing anything.

    On a virtual machine the host backs guest memory lazily: the first use of a page costs far more than
    later ones, and whichever side of a comparison happens to get fresh pages (for its arrays or for
    page cache) looks slow. Touching the memory up front gives both sides the same, already-backed pages.
    """
    import numpy as np

    step = 1 << 30
    for _ in range(int(gib)):
        a = np.ones(step, dtype=np.uint8)
        del a


def mlx_cache_like_macos() -> int:
    """Let MLX keep freed buffers for reuse up to its memory limit, as it does by default on macOS.

    On a Mac, MLX's Metal allocator caches freed buffers up to the memory limit, so a process that
    restores caches again and again gets recycled memory. MLX's Linux CPU backend caches only 32 MiB
    by default; larger arrays go back to glibc, which returns them to the kernel or keeps them by its
    own rules, and a page touched again for the first time costs ~2.5 us on this virtual machine. Which
    side of a comparison then paid for fresh pages changed from run to run (a 512 MiB warm restore
    measured 0.44x one day and 6.4x the next). Set for both sides alike; returns the limit set.
    """
    limit = mx.set_memory_limit(1 << 62)
    mx.set_memory_limit(limit)
    mx.set_cache_limit(limit)
    return limit


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    import mlx_lm

    from kvstore.blas import blas_name

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "blas": blas_name(),
    }


def machine_line(m: dict) -> str:
    """machine() as one line of text, for the reports."""
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']} ({m['device']})"
    )
