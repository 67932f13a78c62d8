"""The parts of a store each operation uses: operations take these, not the whole `Store` (issue 23).

A `Store` has every part; mypy checks at each call that what is passed has the ones asked for. An
operation's signature then says what it can reach: gc cannot start a save, an export cannot write a
blob, and the CLI's SQLAlchemy-free `StoreReader` can serve the accounting reads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvstore.blob.backend import BlobBackend
    from kvstore.blob.iopool import IoPool
    from kvstore.cache.recent_tokens import RecentTokens
    from kvstore.index.db import Engine  # the index's engine (SQLAlchemy stays in kvstore.index)
    from kvstore.index.layers import WholeSeen
    from kvstore.index.reads import Reads

__all__ = ["Indexed", "Stored", "Reader", "Writer", "Importer", "Checked", "Collected", "Reading", "Described"]


class Indexed(Protocol):
    """The index and the chunk size its keys were made with."""

    engine: Engine
    chunk_size: int


class Stored(Indexed, Protocol):
    """The index and the blobs it names (an export reads both)."""

    blobs: BlobBackend


class Reader(Stored, Protocol):
    """The read path: index, blobs and the I/O threads that read them side by side."""

    io: IoPool


class Writer(Reader, Protocol):
    """The save path: the read path's parts, the chunks this process found whole, the models it warned
    about already (a cache whose window lost chunks it did not capture), and each agent's last token list."""

    whole_seen: WholeSeen
    window_warned: set[str]
    recent_tokens: RecentTokens


class Importer(Stored, Protocol):
    """An archive import: index and blobs of a store it may write (`readonly` says), found at `path`."""

    readonly: bool
    path: Path


class Checked(Stored, Protocol):
    """fsck: index and blobs, and how many threads may check blobs at once."""

    io_threads: int


class Collected(Protocol):
    """gc: the index and the blobs, and the folder its lock file lives in beside a SQLite index."""

    engine: Engine
    blobs: BlobBackend
    path: Path


class Reading(Protocol):
    """Plain reads of the index (kvstore.index.reads), through SQLAlchemy or the standard library's sqlite3."""

    chunk_size: int
    io_threads: int

    def reading(self, what: str) -> contextlib.AbstractContextManager[Reads]: ...


class Described(Reading, Protocol):
    """`kvstore info`: the reads, and where the store is."""

    path: Path
    schema_revision: str

    @property
    def shown_url(self) -> str: ...
