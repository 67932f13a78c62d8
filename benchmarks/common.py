"""Helpers shared by the benchmarks: synthetic caches of real model shapes, timing, page-cache control."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import mlx.core as mx
from mlx_lm.models.cache import KVCache

# (layers, kv heads, head dim) of real models, for synthetic KV of the right size.
SHAPES = {
    "qwen2.5-0.5b": (24, 2, 64),
    "llama-3-8b": (32, 8, 128),
    "gemma-3-12b": (48, 8, 256),
}


def synthetic_cache(shape: str, n_tokens: int, seed: int = 0, dtype=mx.bfloat16) -> list:
    """A list of KVCache layers holding n_tokens of random KV in the model's shape."""
    layers, heads, dim = SHAPES[shape]
    key = mx.random.key(seed)
    cache = []
    for _ in range(layers):
        key, a, b = mx.random.split(key, 3)
        c = KVCache()
        if n_tokens:
            c.update_and_fetch(mx.random.normal((1, heads, n_tokens, dim), key=a).astype(dtype),
                               mx.random.normal((1, heads, n_tokens, dim), key=b).astype(dtype))
        cache.append(c)
    mx.eval([c.keys for c in cache if c.keys is not None] + [c.values for c in cache if c.values is not None])
    return cache


def extend(cache: list, n_new: int, seed: int) -> None:
    """Append n_new positions of random KV to every layer (a chat turn)."""
    key = mx.random.key(seed)
    for c in cache:
        key, a, b = mx.random.split(key, 3)
        _, heads, _, dim = c.keys.shape
        c.update_and_fetch(mx.random.normal((1, heads, n_new, dim), key=a).astype(c.keys.dtype),
                           mx.random.normal((1, heads, n_new, dim), key=b).astype(c.keys.dtype))
    mx.eval([c.keys for c in cache] + [c.values for c in cache])


def kv_bytes(shape: str, n_tokens: int, itemsize: int = 2) -> int:
    layers, heads, dim = SHAPES[shape]
    return layers * 2 * heads * dim * n_tokens * itemsize


def eval_cache(cache: list) -> None:
    mx.eval([a for c in cache for a in (c.keys, c.values) if a is not None])


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


def timed(fn, repeat: int = 3, before=None) -> dict:
    """Median, min and max seconds of fn() over `repeat` runs (before() runs untimed first each time)."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": repeat}


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
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            flt.append(_minor_faults() - f0)
    return tuple({"median": statistics.median(t), "min": min(t), "max": max(t), "runs": repeat,
                  "page_faults": int(statistics.median(f))} for t, f in zip(times, faults))


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Unix: no counts
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device()),
            "blas": blas_name()}
