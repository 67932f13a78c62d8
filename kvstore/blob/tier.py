"""The local disk tier of a remote store: a bounded folder of blobs, least recently used evicted first.

A blob read from object storage once is kept here, so the next restore of the same prefix reads a
local file and never touches the network. Nothing here is trusted: the scatter reader hashes every
byte it reads from a tier file, and a file found damaged is dropped and fetched again. Writes are
temp file + rename (a reader never sees half a file) without fsync: a tier file lost in a crash
is fetched again, so durability buys nothing. Recency is the file's mtime, touched on each use, so
several processes can share one tier folder.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from kvstore.blob.tensorfile import write_all
from kvstore.formats import BLOB_SUFFIX


def check_blob_id(blob_id) -> None:
    """InvalidBlobIdError unless `blob_id` is 32 lowercase hex digits (the rule of kvstore.blob.local)."""
    from kvstore.blob.local import is_blob_id
    from kvstore.errors import InvalidBlobIdError

    if not is_blob_id(blob_id):
        raise InvalidBlobIdError(f"{str(blob_id)[:80]!r} is not a blob id (32 lowercase hex digits)", str(blob_id)[:80])


EVICT_TO = 0.9  # an eviction frees down to this share of the budget, so the next add does not evict again


class DiskTier:
    """Up to `max_bytes` of blob files under `root` (sharded like a store's blobs/)."""

    def __init__(self, root: Path, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"the cache size must be a whole number of bytes >= 0, not {max_bytes!r}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bytes = sum(size for _p, size, _m in self._files())  # other processes add too: re-counted on evict

    def path(self, blob_id: str) -> Path:
        check_blob_id(blob_id)  # never a path outside the tier from a crafted id
        return self.root / blob_id[:2] / (blob_id[2:] + BLOB_SUFFIX)

    def has(self, blob_id: str) -> bool:
        """Whether the tier holds a file for the blob; a hit counts as a use (LRU)."""
        try:
            os.utime(self.path(blob_id))
            return True
        except FileNotFoundError:
            return False

    def add(self, blob_id: str, buffers: list, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Keep a copy of a blob whose bytes the caller verified; then evict down to the budget, sparing `keep`."""
        target = self.path(blob_id)
        target.parent.mkdir(exist_ok=True)
        tmp = target.parent / f".{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, buffers)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, target)
        with self._lock:
            self._bytes += sum(len(b) for b in buffers)
            over = self._bytes > self.max_bytes
        if over:
            self.evict(keep | {blob_id})

    def drop(self, blob_id: str) -> None:
        p = self.path(blob_id)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._bytes -= size

    def evict(self, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Remove least recently used files until the tier fits EVICT_TO of its budget; the bytes freed.

        Blobs in `keep` (a restore's own, not yet read) stay even when the tier is over budget.
        """
        files = sorted(self._files(), key=lambda f: f[2])
        total = sum(size for _p, size, _m in files)
        goal = int(self.max_bytes * EVICT_TO)
        freed = 0
        for path, size, _mtime in files:
            if total - freed <= goal:
                break
            if path.parent.name + path.name[: -len(BLOB_SUFFIX)] in keep:
                continue
            try:
                path.unlink()
                freed += size
            except FileNotFoundError:
                pass
        with self._lock:
            self._bytes = total - freed
        return freed

    def used(self) -> int:
        return self._bytes

    def _files(self):
        """(path, bytes, mtime) of every tier file; temp files older than an hour (a crashed add) go."""
        now = time.time()
        for shard in self.root.iterdir() if self.root.is_dir() else ():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            with os.scandir(shard) as entries:
                for e in entries:
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    if e.name.endswith(BLOB_SUFFIX):
                        yield Path(e.path), st.st_size, st.st_mtime
                    elif e.name.endswith(".tmp") and now - st.st_mtime > 3600:
                        Path(e.path).unlink(missing_ok=True)
