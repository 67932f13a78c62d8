"""The index's read queries, as plain SQL that runs on either connection a store reads through.

A `Store` reads through SQLAlchemy (SQLite or PostgreSQL: `db.SqlAlchemyReads`); a read command on a local
SQLite store reads through the standard library's sqlite3 (`sqlite_reads.SqliteReads`) and so starts without
importing SQLAlchemy. Both are a `Reads`: `rows(sql, params)` with `:name` parameters, run in the caller's
read transaction. One text per query serves both, so the two paths cannot drift apart; the statements are
written in the SQL both dialects share. The write queries stay in kvstore.index.queries (SQLAlchemy Core).
"""

from __future__ import annotations

from typing import Protocol

from kvstore.index.translate import parse_json
from kvstore.records import AgentInfo, Snapshot

__all__ = [
    "Reads",
    "NAMESPACE_KEY",
    "WRITTEN_KEY",
    "writes_by_day",
    "scalar",
    "read_meta",
    "schema_revision",
    "agent_infos",
    "snapshot_list",
]

# store_meta key prefix recording which model an unverified import's namespace stands for (kvstore.index.queries).
NAMESPACE_KEY = "imported:"
# store_meta key prefix of the blob bytes written per UTC day ("written:2026-12-07" -> bytes; queries.add_written).
WRITTEN_KEY = "written:"


class Reads(Protocol):
    """A read transaction on the index, whatever the driver."""

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        """Every row `sql` returns, as tuples."""
        ...


def scalar(conn: Reads, sql: str, params: dict | None = None):
    """The first column of the first row, or None when there is no row."""
    rows = conn.rows(sql, params)
    return rows[0][0] if rows else None


def read_meta(conn: Reads) -> dict[str, str]:
    """The store's settings (store_meta): format version, chunk size, hash, imported namespaces."""
    return dict(conn.rows("SELECT key, value FROM store_meta"))


def writes_by_day(conn: Reads) -> dict[str, int]:
    """Blob bytes written per UTC day (YYYY-MM-DD), oldest first: every save counts, deleted blobs too."""
    rows = conn.rows("SELECT key, value FROM store_meta WHERE key LIKE :p", {"p": WRITTEN_KEY + "%"})
    return {k[len(WRITTEN_KEY) :]: int(v) for k, v in sorted(rows)}


def schema_revision(conn: Reads) -> str | None:
    """The Alembic revision the index is stamped with (the caller knows the table exists)."""
    return scalar(conn, "SELECT version_num FROM alembic_version")


# A model's fingerprint as callers know it: an unverified import's namespace shows as its real model.
SHOWN_FINGERPRINT = "COALESCE((SELECT sm.value FROM store_meta sm WHERE sm.key = :ns || m.fingerprint), m.fingerprint)"

# Correlated count: one index range (ix_snapshots_agent) per agent listed, not a grouped scan of
# every snapshot in the store for a single agent's record.
_AGENT_INFOS = f"""
    SELECT a.name, {SHOWN_FINGERPRINT}, a.meta, a.created, a.updated, a.head, COALESCE(h.n_tokens, 0),
           (SELECT COUNT(*) FROM snapshots s WHERE s.agent_id = a.id)
    FROM agents a JOIN models m ON a.model_id = m.id LEFT OUTER JOIN snapshots h ON h.id = a.head
    {{where}} ORDER BY a.name"""


def agent_infos(conn: Reads, name: str | None) -> list[AgentInfo]:
    """AgentInfo of agent `name`, or of every agent (by name) when `name` is None."""
    sql = _AGENT_INFOS.format(where="" if name is None else "WHERE a.name = :name")
    params = {"ns": NAMESPACE_KEY} if name is None else {"ns": NAMESPACE_KEY, "name": name}
    return [
        AgentInfo(
            name=r[0],
            model=r[1],
            meta=parse_json(r[2], f"agent {r[0]!r}'s metadata"),
            created=r[3],
            updated=r[4],
            head=r[5],
            n_tokens=r[6],
            snapshots=r[7],
        )
        for r in conn.rows(sql, params)
    ]


# Bytes of the chunks snapshot `s` was the first retained snapshot (of any agent) to list.
_FIRST_WRITTEN = (
    "(SELECT COALESCE(SUM(c.nbytes), 0) FROM snapshot_chunks sc JOIN chunks c ON c.key = sc.chunk_key "
    "WHERE sc.snapshot_id = s.id AND NOT EXISTS (SELECT 1 FROM agent_chunks ac "
    "JOIN snapshots os ON os.agent_id = ac.agent_id AND os.id < sc.snapshot_id "
    "JOIN snapshot_chunks o ON o.snapshot_id = os.id AND o.seq = sc.seq AND o.chunk_key = sc.chunk_key "
    "WHERE ac.chunk_key = sc.chunk_key))"
)

_SNAPSHOTS = f"""
    SELECT s.id, s.n_tokens, s.created, s.label, s.pinned, {SHOWN_FINGERPRINT}, {_FIRST_WRITTEN}
    FROM snapshots s JOIN agents a ON s.agent_id = a.id JOIN models m ON s.model_id = m.id
    WHERE a.name = :name ORDER BY s.id"""


def snapshot_list(conn: Reads, name: str) -> list[Snapshot] | None:
    """Agent `name`'s snapshots, oldest first; None if there is no such agent.

    `bytes_written` is the bytes of the chunks a snapshot was the first retained snapshot (of any
    agent) to list: what its save wrote, as long as older snapshots have not been collected.
    """
    if not conn.rows("SELECT id FROM agents WHERE name = :name", {"name": name}):
        return None
    return [
        Snapshot(
            id=r[0],
            agent=name,
            model=r[5],
            n_tokens=r[1],
            created=r[2],
            label=r[3],
            pinned=bool(r[4]),
            bytes_written=int(r[6] or 0),
        )
        for r in conn.rows(_SNAPSHOTS, {"name": name, "ns": NAMESPACE_KEY})
    ]
