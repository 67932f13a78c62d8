"""Garbage collection: retention, then unreferenced chunks, then blob files past the grace period.

Order matters for safety against concurrent saves: rows go first (one transaction), files only
after that commit, and only under the write lock once no row names them again and their mtime is
older than the grace period (a save touches a file it dedups against).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kvstore._crash import crash_point
from kvstore.errors import StoreLockedError
from kvstore.index import db, garbage
from kvstore.ops import reserve
from kvstore.records import GcReport

if TYPE_CHECKING:
    from kvstore.blob.backend import BlobBackend
    from kvstore.index.db import Engine  # the index's engine (SQLAlchemy stays in kvstore.index)
    from kvstore.ops.parts import Collected

__all__ = ["gc", "gc_lock", "check_grace", "stale_temps", "temp_in_use"]

FILE_BATCH = 1000  # files removed per write transaction: keeps the write lock short for savers


@contextlib.contextmanager
def gc_lock(store: Collected) -> Iterator[None]:
    """One gc at a time per store: a file lock beside a SQLite index, an advisory lock on PostgreSQL."""
    if store.engine.dialect.name == "postgresql":
        with garbage.advisory_lock(store.engine) as got:
            if not got:
                raise StoreLockedError("another gc is running on this store")
            yield
        return
    path = store.path / "gc.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"another gc is running on {store.path}") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_grace(grace) -> None:
    """grace is seconds: a number >= 0."""
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise TypeError(f"grace must be a number of seconds, not {type(grace).__name__}")
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")


def gc(
    store: Collected, dry_run: bool, keep_last: int, grace: float, progress=None, agents: Iterable[str] | None = None
) -> GcReport:
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be a whole number >= 1, not {keep_last!r}")
    check_grace(grace)
    t0 = time.perf_counter()
    with gc_lock(store):
        if dry_run:
            return _dry_run(store, keep_last, grace, t0, agents)
        doomed, chunk_keys, dead = reserve.freeing(
            lambda: _drop_rows(store.engine, keep_last, agents), root=store.path, engine=store.engine
        )
        crash_point("gc.after_rows")
        files, freed = _sweep_files(
            engine=store.engine, blobs=store.blobs, grace=grace, progress=progress, unreferenced={b for b, _ in dead}
        )
        temps = _sweep_temp(store.blobs, grace)
        if store.engine.dialect.name == "sqlite":
            reserve.ensure(store.path)  # room was freed: keep some for the next full disk
    return GcReport(
        dry_run=False,
        snapshots_removed=len(doomed),
        chunks_removed=len(chunk_keys),
        blobs_removed=len(dead),
        files_removed=files,
        temp_removed=temps,
        bytes_freed=freed,
        seconds=round(time.perf_counter() - t0, 3),
    )


def _drop_rows(engine: Engine, keep_last: int, agents: Iterable[str] | None) -> garbage.Dropped:
    """Retention, then unreferenced chunks and blob rows, in one transaction: (snapshots, chunks, blobs) dropped."""
    with db.transaction(engine, write=True, what="collecting garbage") as conn:
        return garbage.drop_unreachable(conn, keep_last, agents)


def _sweep_files(
    *, engine: Engine, blobs: BlobBackend, grace: float, progress, unreferenced: set[str]
) -> tuple[int, int]:
    """Remove the files of blobs whose rows this gc removed, and files no row names older than the grace period.

    A file without a row may be a save in flight (written, not yet committed): the grace period
    leaves it alone. Should a save rely on a file removed here anyway, its commit sees it gone and
    writes it again (ops.save).
    """
    now = time.time()
    with db.transaction(engine, write=False, what="listing blobs") as conn:
        known = garbage.known_blob_ids(conn)
    candidates = [(b, p) for b, p in blobs.iter_files() if b not in known]
    candidates = [(b, p) for b, p in candidates if b in unreferenced or blobs.age(p, now) > grace]
    # Listed shard by shard, concurrent unlinks would queue on one directory's lock; ordered by the id
    # after the shard prefix, neighbours sit in different shards.
    candidates.sort(key=lambda c: c[0][2:])
    removed = freed = 0
    total = len(candidates)
    for i in range(0, total, FILE_BATCH):
        batch = candidates[i : i + FILE_BATCH]
        with db.transaction(engine, write=True, what="removing blob files") as conn:
            # Re-check under the write lock: a save may have committed a row for one of them since.
            back = garbage.still_named(conn, [b for b, _ in batch])
            doomed = [
                blob_id
                for blob_id, path in batch
                if not (blob_id in back or (blob_id not in unreferenced and blobs.age(path) <= grace))
            ]
            # The backend batches: overlapped unlinks on a folder, DeleteObjects on S3.
            for size in blobs.remove_many(doomed):
                removed += 1
                freed += size
                crash_point("gc.file_removed")
        if progress:
            progress(min(i + FILE_BATCH, total), total)
    return removed, freed


def temp_in_use(path: Path) -> bool:
    """Whether a live write holds this temp file (BlobStore.put keeps it flock'ed until the rename).

    A crashed writer's lock died with it, so with grace=0 gc can take every stale temp file and
    never a live one.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # already gone
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def stale_temps(blobs: BlobBackend, grace: float, now: float | None = None) -> list[Path]:
    """The backend's temp files older than `grace` that no live write holds."""
    now = now or time.time()
    return [p for p in blobs.iter_temp() if blobs.age(p, now) > grace and not temp_in_use(p)]


def _sweep_temp(blobs: BlobBackend, grace: float) -> int:
    n = 0
    for p in stale_temps(blobs, grace):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _dry_run(store: Collected, keep_last: int, grace: float, t0: float, agents: Iterable[str] | None) -> GcReport:
    """What gc would remove, counted without changing anything."""
    with db.transaction(store.engine, write=False, what="planning gc") as conn:
        found = garbage.unreachable(conn, keep_last, agents)
    doomed, dead_chunks, dead, known = found
    now = time.time()
    dead_ids = {bid for bid, _ in dead}
    orphans = [
        (bid, p)
        for bid, p in store.blobs.iter_files()
        if bid not in known and bid not in dead_ids and store.blobs.age(p, now) > grace
    ]
    temps = len(stale_temps(store.blobs, grace, now))
    freed = sum(n for _, n in dead) + sum(store.blobs.size(p) for _, p in orphans)
    return GcReport(
        dry_run=True,
        snapshots_removed=len(doomed),
        chunks_removed=len(dead_chunks),
        blobs_removed=len(dead),
        files_removed=len(dead) + len(orphans),
        temp_removed=temps,
        bytes_freed=freed,
        seconds=round(time.perf_counter() - t0, 3),
    )
