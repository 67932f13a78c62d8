"""A folder store's index read through the standard library's sqlite3: read commands without SQLAlchemy.

Importing SQLAlchemy alone takes longer than the rest of a `kvstore info` (issue 17). A read needs none
of it: `SqliteIndex.open` checks what kvstore.open() would (the index at this kvstore's schema head,
settings it can read) and hands out read transactions that run the plain SQL of kvstore.index.reads.
Anything else (no index yet, an older schema to upgrade, a newer one, damage, a lock) returns None, and
the caller opens the store in full, which upgrades or refuses with its own errors: this module never
reports a store's state itself, so both paths cannot disagree on it.

The connection is read-write at the SQLite level, as a full open's is, with `query_only` on: mode=ro
could not remove the WAL files on close, and would leave index.db-wal and -shm behind after every read.
On read-only media it is mode=ro (immutable when no WAL is left), again as a full open does.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from kvstore.formats import FORMAT_VERSION, HASH_NAME, SCHEMA_REVISION
from kvstore.index import reads
from kvstore.index.location import folder_url, frozen, index_path, rendered_url
from kvstore.index.translate import translate

__all__ = ["SqliteReads", "SqliteIndex"]


class SqliteReads:
    """A sqlite3 connection as a `reads.Reads` (sqlite3 takes the `:name` parameters as they are)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        return self.conn.execute(sql, params or {}).fetchall()


class SqliteIndex:
    """A folder store's index, open for reading; `reading(what)` gives one read transaction."""

    def __init__(self, root: Path, readonly: bool, timeout: float):
        self.root = root
        self.readonly = readonly
        self.timeout = timeout
        index = index_path(root).resolve()
        mode = "ro" if readonly else "rw"
        self._uri = f"file:{quote(str(index))}?mode={mode}{'&immutable=1' if frozen(root, readonly) else ''}"
        # What Stats.url shows: the URL a full open would use, as SQLAlchemy renders it.
        self.url = rendered_url(folder_url(root, readonly))
        self._lock = threading.Lock()
        self._conn = self._connect()
        self.revision: str | None = None
        self.meta: dict[str, str] = {}

    @classmethod
    def open(cls, root: str | os.PathLike, timeout: float = 30.0, readonly: bool | None = None) -> SqliteIndex | None:
        """The index of folder store `root` when it is ready to read as it is, else None (open it in full).

        `readonly`: as kvstore.open() would take it (None: when the folder is not writable).
        """
        root = Path(root).expanduser()
        index = index_path(root)
        if "?" in str(index.resolve()) or "%" in str(index.resolve()):
            return None  # the full open's URL reads such a path its own way: leave it to it
        try:
            if not index.is_file() or index.stat().st_size == 0:
                return None
            if readonly is None:
                readonly = not os.access(root, os.W_OK)
            found = cls(root, readonly=readonly, timeout=timeout)
        except (OSError, sqlite3.Error):
            return None
        try:
            with found.reading("opening the index") as conn:
                found.revision = reads.schema_revision(conn)
                found.meta = reads.read_meta(conn)
            if found._ready():
                return found
        except Exception:  # a missing table, a damaged file, a lock: the full open says what it is
            pass
        found.close()
        return None

    def _ready(self) -> bool:
        """Whether a full open would read this index as it is: at the schema head, with settings it accepts."""
        meta = self.meta
        return (
            self.revision == SCHEMA_REVISION
            and meta.get("hash") == HASH_NAME
            and int(meta.get("format_version", FORMAT_VERSION + 1)) <= FORMAT_VERSION
            and int(meta.get("chunk_size", 0)) > 0
        )

    @property
    def chunk_size(self) -> int:
        return int(self.meta["chunk_size"])

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._uri, uri=True, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[SqliteReads]:
        """One read transaction; a second thread reading at the same time gets a connection of its own."""
        mine = self._lock.acquire(blocking=False)
        try:
            conn = self._conn if mine else self._connect()
            try:
                conn.execute("BEGIN")
                try:
                    yield SqliteReads(conn)
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")  # it changed nothing: ending it either way is the same
            finally:
                if not mine:
                    conn.close()
        except sqlite3.Error as e:
            raise translate(e, what) from e
        finally:
            if mine:
                self._lock.release()

    def close(self) -> None:
        self._conn.close()
