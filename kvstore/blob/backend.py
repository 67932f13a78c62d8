"""The blob backend interface: what the engine asks of wherever blobs live.

Two implementations: `kvstore.blob.local.BlobStore` (a folder: local disk, NFS, SMB) and
`kvstore.blob.s3.S3Blobs` (an S3-compatible bucket, with a local disk tier in front). Both keep the
write protocol's order: `put` returns only once the blob is durable and its bytes hash to its id,
so the index transaction that names it commits after it; `remove`/`remove_many` run only after the
commit that unreferences a blob (gc and fsck call them under the index's write lock).

`iter_files` yields (blob id, entry); an entry is the backend's own listing record (a Path, an
object's key/size/mtime), read back through `age`, `size` and `describe`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.errors import InvalidBlobIdError

if TYPE_CHECKING:
    from kvstore.blob.iopool import IoPool

PathOf = Callable[[str], "str | Path"]


def _call(fn: Callable[[], tuple[str, int, bool]]) -> tuple[str, int, bool]:
    return fn()


class BlobBackend(ABC):
    """Where a store's blobs live. Ids are xxh3-128 hex digests of the blob's bytes."""

    durable: bool
    remote: bool = False  # True when reads cross a network: restores go through local_paths()

    @abstractmethod
    def describe_location(self) -> str:
        """The folder or bucket, for messages."""

    @abstractmethod
    def name_of(self, blob_id: str) -> str:
        """Where the blob is (a path, an s3:// URL), for messages."""

    def check_id(self, blob_id: str) -> None:
        """InvalidBlobIdError unless `blob_id` is a blob id (32 lowercase hex digits): run before acting on an
        id from outside (an argument, an index row), so that nothing else is named by it (a file, a key, a row)."""
        from kvstore.blob.local import is_blob_id  # here: local.py imports this module

        if not is_blob_id(blob_id):
            raise InvalidBlobIdError(
                f"{str(blob_id)[:80]!r} is not a blob id (32 lowercase hex digits)", str(blob_id)[:80]
            )

    def ensure_dirs(self) -> None:
        """Create whatever the backend needs before the first write (nothing, by default)."""

    # -- writing ---------------------------------------------------------------------------

    @abstractmethod
    def put(
        self, buffers: list, blob_id: str | None = None, copied: Callable[[str], None] | None = None
    ) -> tuple[str, int, bool]:
        """Store the blob made of `buffers` durably; (id, bytes, written) — written is False for a dedup hit.

        `copied` is called with the blob's id once the bytes have left the caller's buffers (if it writes).
        """

    def start_put(self, buffers: list) -> tuple[str, Callable[[], tuple[str, int, bool]]]:
        """Begin storing the blob made of `buffers`: its id now, and the rest of put() as a function
        that returns put()'s (id, bytes, written) once the blob is durable (the caller runs it, on an
        I/O thread or its own; always, also when it gives up: a local store holds a temp file open
        until then). The buffers must stay unchanged until it has run.

        By default the caller hashes here and the function is put(); a backend may do more here.
        """
        from kvstore.blob.local import hash_buffers  # here: local.py imports this module

        blob_id = hash_buffers(buffers)
        return blob_id, functools.partial(self.put, buffers, blob_id)

    def finish_all(
        self, finishes: list[Callable[[], tuple[str, int, bool]]], io: IoPool
    ) -> list[tuple[str, int, bool]]:
        """Run start_put()'s functions of several blobs (on `io`, side by side, by default: a remote
        backend's puts wait on the network); their results in order. Runs on one of io's threads."""
        return io.map(_call, finishes)

    @staticmethod
    def run_each(finishes: list[Callable[[], tuple[str, int, bool]]]) -> list[tuple[str, int, bool]]:
        """The functions one after another, every one of them also after one raised (a local store's
        close their temp files); their results in order, or the first error."""
        results, error = [], None
        for finish in finishes:
            try:
                results.append(finish())
            except BaseException as e:  # noqa: BLE001 - raised below, once the rest have run
                error = error or e
        if error is not None:
            raise error
        return results

    def sync_dirs(self, blob_ids: Iterable[str]) -> None:
        """Make dedup hits durable before a commit relies on them (a folder's rename; nothing on S3)."""

    # -- reading ---------------------------------------------------------------------------

    @abstractmethod
    def read(self, blob_id: str, agent: str | None = None) -> bytearray:
        """The blob's bytes, checked against its id (MissingBlobError, CorruptBlobError)."""

    @abstractmethod
    def read_range(self, blob_id: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob, unverified: the caller checks the whole it assembles."""

    @abstractmethod
    def exists(self, blob_id: str) -> bool: ...

    def missing(self, blob_ids: Iterable[str]) -> set[str]:
        """The ids among `blob_ids` with no blob (a save's last check before its commit)."""
        return {b for b in blob_ids if not self.exists(b)}

    @abstractmethod
    def stat(self, blob_id: str) -> tuple[int, float] | None:
        """(bytes, modified time) of a blob, or None when it is gone."""

    @abstractmethod
    def hashes_to_name(self, blob_id: str, buf: bytearray) -> bool:
        """Whether the blob's bytes hash to its id (FileNotFoundError when it is gone)."""

    def verify(self, blob_id: str) -> bool:
        try:
            return self.hashes_to_name(blob_id, bytearray(1 << 20))
        except FileNotFoundError:
            return False

    def local_paths(self, blob_ids: Iterable[str], agent: str | None = None) -> PathOf:
        """A function from id to a local file holding the blob, for the scatter reader.

        A remote backend fetches what its disk tier lacks first (concurrently); the scatter reader
        verifies every byte as it lands, as it does for a local store.
        """
        raise NotImplementedError

    def forget_local(self, blob_id: str) -> bool:
        """Drop a local copy found damaged; True when a fresh one can be fetched (a remote backend).

        False for a folder (its file is the blob) and for a blob whose remote copy itself failed its
        hash: a mismatch is never retried, asking again returns the same bytes."""
        return False

    # -- listing and removal (gc, fsck) ----------------------------------------------------

    @abstractmethod
    def iter_files(self) -> Iterator[tuple[str, Any]]:
        """(blob id, entry) of every blob-shaped object."""

    @abstractmethod
    def age(self, entry: Any, now: float | None = None) -> float:
        """Seconds since the entry's blob was last written (or, on a folder, touched by a dedup hit)."""

    @abstractmethod
    def size(self, entry: Any) -> int: ...

    def describe(self, entry: Any) -> str:
        return str(entry)

    @abstractmethod
    def remove(self, blob_id: str) -> int:
        """Delete a blob; the bytes freed (0 if it was already gone)."""

    def remove_many(self, blob_ids: list[str]) -> list[int]:
        """Delete blobs (a batch); the bytes freed per blob (0 for one already gone)."""
        return [self.remove(b) for b in blob_ids]

    def iter_temp(self) -> Iterator[Path]:
        """Unfinished writes' temp files (a folder's tmp/; S3 PUTs are atomic and leave none)."""
        return iter(())

    def close(self) -> None:
        """Release clients and threads."""
