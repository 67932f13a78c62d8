"""The read half of the Store's API, and `StoreReader`: a folder store opened only to read, without SQLAlchemy.

`Store` (kvstore.store) reads its index through SQLAlchemy. The CLI's read commands (`info`, `agents`, `show`,
`models`, `du`) on a folder store use a `StoreReader`, which reads the same index through the standard
library's sqlite3 (kvstore.index.sqlite_reads) and so starts without importing SQLAlchemy (issue 17). Both
inherit the methods below, whose queries are the plain SQL of kvstore.index.reads and reads_accounting (through
kvstore.ops.accounting) run through `reading()`: the two cannot return different records
(tests/test_store_reader.py runs both on one store and compares).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kvstore.errors import UnknownAgentError
from kvstore.index import reads
from kvstore.index.sqlite_reads import SqliteIndex
from kvstore.names import validate_name
from kvstore.records import AgentBytes, AgentInfo, Snapshot, Stats

__all__ = ["StoreReads", "StoreReader"]


class StoreReads:
    """Reads of a store's index. A subclass gives `reading(what)` (a read transaction as a `reads.Reads`),
    `path`, `shown_url` (the index URL, password hidden), `schema_revision`, `chunk_size` and `io_threads`."""

    path: Path
    schema_revision: str
    chunk_size: int
    io_threads: int

    @property
    def shown_url(self) -> str:
        raise NotImplementedError

    def reading(self, what: str) -> contextlib.AbstractContextManager[reads.Reads]:
        raise NotImplementedError

    def agent(self, name: str) -> AgentInfo:
        validate_name(name)
        for info in self._agent_infos(name):
            return info
        raise UnknownAgentError(f"no agent named {name!r} in this store")

    def agents(self) -> list[AgentInfo]:
        """Every agent, by name."""
        return self._agent_infos(None)

    def _agent_infos(self, name: str | None) -> list[AgentInfo]:
        with self.reading("listing agents") as conn:
            return reads.agent_infos(conn, name)

    def snapshots(self, name: str) -> list[Snapshot]:
        """An agent's snapshots, oldest first (`bytes_written`: see reads.snapshot_list)."""
        validate_name(name)
        with self.reading("listing snapshots") as conn:
            out = reads.snapshot_list(conn, name)
        if out is None:
            raise UnknownAgentError(f"no agent named {name!r} in this store")
        return out

    def agent_bytes(self, name: str | None = None) -> dict[str, AgentBytes]:
        """Bytes of each agent's head snapshot (or only `name`'s): unique to it and shared with other agents.

        Deleting an agent and running gc frees its `unique_bytes`; the sum of every agent's `total_bytes`
        is the store's logical bytes.
        """
        from kvstore.ops.accounting import agent_bytes

        return {n: AgentBytes(**b) for n, b in agent_bytes(self, name).items()}

    def writes_by_day(self) -> dict[str, int]:
        """Blob bytes the store's saves wrote per UTC day ("YYYY-MM-DD"), oldest first; blobs deleted
        since still count (what the disk wore, not what it holds)."""
        with self.reading("reading the write accounting") as conn:
            return reads.writes_by_day(conn)

    def stats(self) -> Stats:
        """Counts, bytes on disk, and the dedup ratio against one file per agent."""
        from kvstore.ops.accounting import store_stats

        return store_stats(self)


class StoreReader(StoreReads):
    """A folder store opened only to read, through sqlite3: `open()` gives one, or None where only
    `kvstore.open()` can open the store (see kvstore.index.sqlite_reads). A context manager, or call `close()`."""

    readonly = True

    def __init__(self, path: Path, index: SqliteIndex, io_threads: int = 4):
        self.path = path
        self.index = index
        self.schema_revision = index.revision or ""
        self.chunk_size = index.chunk_size
        self.io_threads = io_threads

    @classmethod
    def open(cls, path: str | os.PathLike, *, timeout: float = 30.0, io_threads: int = 4) -> StoreReader | None:
        """The folder store at `path` for reading, or None: no index there yet, or one that a full open
        would first upgrade, refuse or wait for."""
        root = Path(os.fspath(path)).expanduser()
        index = SqliteIndex.open(root, timeout=timeout)
        return None if index is None else cls(root, index, io_threads)

    @property
    def shown_url(self) -> str:
        return self.index.url

    def reading(self, what: str) -> contextlib.AbstractContextManager[reads.Reads]:
        return self.index.reading(what)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvstore.StoreReader {self.path} chunk_size={self.chunk_size}>"
