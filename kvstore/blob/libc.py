"""The C library on Linux, for the two calls Python's os module lacks (madvise on an address MLX owns,
sync_file_range); None elsewhere, where callers skip what they would have asked of it."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["LIBC"]


def _load():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


LIBC = _load()
