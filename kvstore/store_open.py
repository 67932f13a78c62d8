"""Where `kvstore.open()`'s store is, and making it ready: locate the index and the blobs, then create what is missing.

`locate` reads the arguments and the environment and touches nothing; `folder_store` and `s3_store` refuse
what is not a store, create what a new one needs, and say how to open it (`Opening`). `kvstore.store.open`
builds the `Store` from that.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from kvstore.blob.backend import BlobBackend
from kvstore.blob.local import BlobStore
from kvstore.errors import IndexDatabaseError, NotAStoreError, ReadOnlyStoreError, StoreError
from kvstore.home import default_home
from kvstore.index.location import INDEX_FILE, folder_url, index_path, sqlite_root, sqlite_url
from kvstore.ops import reserve

__all__ = ["Location", "Opening", "locate", "folder_store", "s3_store"]

# What a store being created holds before its index.db appears: another process creating the same
# store at the same moment has got this far (issue 15, item 10).
_SKELETON = {
    "blobs",
    "tmp",
    "gc.lock",
    "reserve",
    "reserve.tmp",
    INDEX_FILE + "-journal",
    INDEX_FILE + "-wal",
    INDEX_FILE + "-shm",
}


@dataclass(frozen=True, slots=True)
class Location:
    """A store as open()'s arguments and the environment name it; nothing is checked or created yet."""

    target: str  # a database URL, or a store folder (its SQLite index is index.db inside it)
    blobs: str | None  # a URL store's blob folder, an s3:// bucket URL, or None (a folder store's own)

    @property
    def is_url(self) -> bool:
        return "://" in self.target

    @property
    def in_s3(self) -> bool:
        return self.blobs is not None and self.blobs.startswith("s3://")


@dataclass(frozen=True, slots=True)
class Opening:
    """What a `Store` is built from once its folders exist."""

    url: str  # the index's SQLAlchemy URL
    root: Path  # the store folder (a URL store's blob folder; an S3 store's disk tier or index folder)
    readonly: bool
    blobs: BlobBackend | None = None  # None: the local blob folder under `root`


def locate(
    path_or_url: str | os.PathLike | None, *, index: str | os.PathLike | None, blobs: str | os.PathLike | None
) -> Location:
    """The store open() is asked for: `index` is path_or_url by another name; $KVSTORE_BLOBS names the blobs
    of a URL store, or an S3 bucket for any store; no path at all is $KVSTORE_HOME or ~/.kvstore."""
    if index is not None:
        if path_or_url is not None:
            raise TypeError("give the index once: open(path_or_url) or open(index=...)")
        path_or_url = index
    env_blobs = os.environ.get("KVSTORE_BLOBS")
    if blobs is None and env_blobs and ("://" in os.fspath(path_or_url or "") or env_blobs.startswith("s3://")):
        blobs = env_blobs
    target = os.fspath(default_home() if path_or_url is None else path_or_url)
    return Location(target, None if blobs is None else os.fspath(blobs))


def folder_store(where: Location, *, create: bool, readonly: bool | None, durable: bool) -> Opening:
    """A store whose blobs are in a local folder: the folder checked (and created), its skeleton made
    unless it is opened read-only (None: read-only when the folder is not writable)."""
    if where.is_url:
        url: str | None = where.target
        root = Path(where.blobs) if where.blobs is not None else sqlite_root(where.target)
        if root is None:
            raise TypeError("a database URL store needs blobs=PATH: the (shared) folder that holds the blobs")
    else:
        url, root = None, Path(where.target).expanduser()
        _check_folder(root)
        if not root.exists():
            if not create:
                raise NotAStoreError(f"no store at {root}")
            try:
                root.mkdir(parents=True, exist_ok=True)  # another process may be creating it too
            except OSError as e:
                raise StoreError(f"cannot create a store at {root}: {e.strerror}") from e
    if readonly is None:
        readonly = root.exists() and not os.access(root, os.W_OK)
    elif not readonly and root.is_dir() and not os.access(root, os.W_OK):
        raise ReadOnlyStoreError(f"{root} is not writable (a read-only mount?): open it with readonly=True to load")
    if url is None:
        url = folder_url(root, readonly)  # immutable on read-only media with no WAL left
    if not readonly:
        try:
            BlobStore(root, durable=durable).ensure_dirs()
        except OSError as e:
            raise StoreError(f"cannot create the blob folders in {root}: {e.strerror}") from e
        if url.startswith("sqlite"):
            reserve.ensure(root)  # room for delete and gc to work on a full disk (ops.reserve)
    return Opening(url, root, readonly)


def _check_folder(root: Path) -> None:
    """Refuse a folder store's path that holds something else than a store (or a store being created)."""
    if root.exists() and not root.is_dir():
        raise NotAStoreError(f"{root} is a file, not a kvstore store (a store is a folder)")
    if root.is_dir() and not index_path(root).exists() and _foreign_entries(root):
        raise NotAStoreError(f"{root} is not a kvstore store: it has files but no {INDEX_FILE}")
    if (
        index_path(root).is_file()
        and index_path(root).stat().st_size == 0
        and next(BlobStore(root).iter_files(), None) is not None
    ):
        # SQLite would take the empty file for a new index, and gc would then sweep every blob.
        raise IndexDatabaseError(
            f"{root / INDEX_FILE} is empty but the store holds blobs: the index was "
            "truncated; restore it from a backup (blobs alone cannot rebuild agents)"
        )


def _foreign_entries(root: Path) -> list[str]:
    """Entries of a folder without an index that a store's own creation does not make (blob files
    without an index are a store that lost its index, not one being created)."""
    foreign = [e for e in os.listdir(root) if e not in _SKELETON]
    return foreign or [str(p) for _b, p in itertools.islice(BlobStore(root).iter_files(), 1)]


def s3_store(
    where: Location, *, cache_dir: str | os.PathLike | None, cache_size: int | str | None, readonly: bool | None
) -> Opening:
    """A store whose index is a database URL or a folder's index.db and whose blobs are in a bucket."""
    from kvstore.blob.s3 import S3Blobs
    from kvstore.sizes import parse_size

    assert where.blobs is not None
    target = where.target
    root: Path | None
    if not where.is_url:  # a folder holds the SQLite index (one machine); the bucket holds the blobs
        root = Path(target).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        target = sqlite_url(root)
    else:
        root = sqlite_root(target)
    size = parse_size(cache_size if cache_size is not None else os.environ.get("KVSTORE_CACHE_SIZE"))
    backend = S3Blobs(where.blobs, cache_dir=cache_dir, cache_size=size)
    try:
        backend.check_bucket()
    except BaseException:
        backend.close()
        raise
    # gc's lock file (SQLite indexes) goes beside the index; a server index locks in the database.
    return Opening(target, root or backend.tier.root, bool(readonly), backend)
