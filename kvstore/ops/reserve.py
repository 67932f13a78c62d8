"""Room to free room: the way out of a full disk (`delete`, `gc`) must work on a full disk.

Every SQLite write, a delete too, appends to the write-ahead log first; on a full disk it cannot, so
gc could not free anything while `gc --dry-run` showed plenty to reclaim (issue 15, item 12). A
store keeps a small preallocated `reserve` file. When a delete or gc hits a full disk it first
checkpoints the WAL (the next transaction then rewinds into the WAL's existing pages) and retries,
then gives up the reserve and retries; gc makes the reserve again once it has freed space.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kvstore.errors import StoreFullError
from kvstore.index import wal

if TYPE_CHECKING:
    from kvstore.index.db import Engine  # the index's engine (SQLAlchemy stays in kvstore.index)

RESERVE_FILE = "reserve"
RESERVE_BYTES = 8 << 20  # WAL pages for a gc of some 2,000 pages of index rows
RESERVE_SHARE = 32  # but never more than 1/32 of the filesystem (a small test mount)
T = TypeVar("T")


def reserve_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return min(RESERVE_BYTES, st.f_blocks * st.f_frsize // RESERVE_SHARE)


def ensure(root: Path) -> bool:
    """Make the reserve file if it is missing (best effort: False when there is no room for it)."""
    path = Path(root) / RESERVE_FILE
    if path.exists():
        return True
    tmp = path.with_name(RESERVE_FILE + ".tmp")
    try:
        size = reserve_bytes(root)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)  # real blocks, not a sparse file: they are what is freed
            else:
                os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def release(root: Path) -> int:
    """Delete the reserve; the bytes it gave back."""
    path = Path(root) / RESERVE_FILE
    try:
        size = path.stat().st_blocks * 512
        path.unlink()
        return size
    except OSError:
        return 0


def _checkpoint(engine: Engine) -> None:
    """Checkpoint the WAL so the next writer rewinds into the WAL file's existing pages (kvstore.index.wal)."""
    try:
        wal.checkpoint(engine)
    except Exception:  # noqa: BLE001 - best effort: the retry reports what is still wrong
        pass


def freeing(work: Callable[[], T], *, root: Path, engine: Engine) -> T:
    """Run a write that frees space (delete, gc) on the index `engine` of the store at `root`; on a full
    disk checkpoint and retry, then give up the reserve and retry."""
    try:
        return work()
    except StoreFullError:
        _checkpoint(engine)
    try:
        return work()
    except StoreFullError:
        if not release(root):
            raise
        _checkpoint(engine)
    return work()
