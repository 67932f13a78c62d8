"""Garbage collection's statements: retention, the rows no snapshot reaches, the gc lock of a shared index.

Files are kvstore.ops.gc's business; every statement it runs is here, each in the caller's transaction
(`db.transaction`), except `advisory_lock`, which holds a session of its own for the whole gc.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from sqlalchemy import and_, delete, func, not_, select, text
from sqlalchemy.engine import Engine

from kvstore.index import agent_chunks, db, removals, schema
from kvstore.index.queries import batches

__all__ = [
    "Dropped",
    "GC_CACHE_KIB",
    "advisory_lock",
    "doomed_snapshots_query",
    "doomed_snapshots",
    "drop_unreachable",
    "known_blob_ids",
    "still_named",
    "Unreachable",
    "unreachable",
]

GC_CACHE_KIB = 256 * 1024  # SQLite page cache for gc's big transaction


@contextlib.contextmanager
def advisory_lock(engine: Engine) -> Iterator[bool]:
    """PostgreSQL's advisory gc lock, held for the block; yields whether it was got (never waits)."""
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": db.PG_GC_LOCK}).scalar())
        conn.commit()  # the lock is the session's; don't sit "idle in transaction" for the whole gc
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": db.PG_GC_LOCK})
                conn.commit()


def doomed_snapshots_query(keep_last: int, agents: list[str] | None = None):
    """Snapshots past the retention policy: not among an agent's last keep_last, not its head, not kept
    (and, given `agents`, only those agents' snapshots)."""
    s, a = schema.snapshots, schema.agents
    newer = (
        select(func.count())
        .select_from(s.alias("newer"))
        .where(and_(text("newer.agent_id = snapshots.agent_id"), text("newer.id > snapshots.id")))
        .scalar_subquery()
    )
    heads = select(a.c.head).where(a.c.head.is_not(None))
    whose = [s.c.agent_id.in_(select(a.c.id).where(a.c.name.in_(agents)))] if agents is not None else []
    return select(s.c.id).where(
        and_(
            newer >= keep_last,
            not_(s.c.id.in_(heads)),
            s.c.pinned == False,  # noqa: E712
            s.c.label.is_(None),
            *whose,
        )
    )


def doomed_snapshots(conn, keep_last: int, agents: Iterable[str] | None) -> list[int]:
    """The ids doomed_snapshots_query finds, for every agent or for the named ones (in batches)."""
    if agents is None:
        return [r for (r,) in conn.execute(doomed_snapshots_query(keep_last))]
    return [
        r for part in batches(sorted(set(agents))) for (r,) in conn.execute(doomed_snapshots_query(keep_last, part))
    ]


# Both scans run in key order: SQLite then walks the key's own index and probes the referencing
# index in order too, instead of at random (issue 4's gc benchmark: 2.4 s -> 0.4 s for 1,000,000 blobs).
# agent_chunks's key leads with the chunk key: both walk in key order.
def _unreferenced_chunks():
    ac, c = schema.agent_chunks, schema.chunks
    return select(c.c.key).where(not_(c.c.key.in_(select(ac.c.chunk_key)))).order_by(c.c.key)


def _unreferenced_blobs():
    cl, b = schema.chunk_layers, schema.blobs
    # The size comes from a lookup per dead blob, so the scan itself stays on the id index.
    x = b.alias("x")
    size = select(x.c.nbytes).where(x.c.id == b.c.id).scalar_subquery()
    return select(b.c.id, size).where(not_(b.c.id.in_(select(cl.c.blob_id)))).order_by(b.c.id)


class Dropped(NamedTuple):
    """What one gc transaction removed: snapshot ids, chunk keys, and (blob id, bytes) of each blob row."""

    snapshots: list[int]
    chunks: list[bytes]
    blobs: list[tuple[str, int]]


def drop_unreachable(conn, keep_last: int, agents: Iterable[str] | None) -> Dropped:
    """Retention, then unreferenced chunks and blob rows, in the caller's write transaction."""
    restore_cache = _big_page_cache(conn)
    s = schema.snapshots
    doomed = doomed_snapshots(conn, keep_last, agents)
    owners: set[int] = set()
    for part in batches(doomed):
        owners |= {a for (a,) in conn.execute(select(s.c.agent_id).where(s.c.id.in_(part)).distinct())}
        conn.execute(delete(schema.snapshot_chunks).where(schema.snapshot_chunks.c.snapshot_id.in_(part)))
        conn.execute(delete(s).where(s.c.id.in_(part)))
    agent_chunks.unlist(conn, sorted(owners))  # what their older snapshots alone listed
    chunk_keys = [k for (k,) in conn.execute(_unreferenced_chunks())]
    if chunk_keys:  # their layer rows go with them: a save's earlier lookups no longer hold
        removals.changed(conn)
    for part in batches(chunk_keys):
        conn.execute(delete(schema.chunk_layers).where(schema.chunk_layers.c.chunk_key.in_(part)))
        conn.execute(delete(schema.chunks).where(schema.chunks.c.key.in_(part)))
    dead = [(b, n) for b, n in conn.execute(_unreferenced_blobs()).all()]
    for part in batches([b for b, _ in dead]):
        conn.execute(delete(schema.blobs).where(schema.blobs.c.id.in_(part)))
    restore_cache()
    return Dropped(doomed, chunk_keys, dead)


def _big_page_cache(conn) -> Callable[[], object]:
    """Give this SQLite connection a large page cache for gc's one big transaction; returns the undo.

    Deleting 100,000 chunks touches more index pages than SQLite's default 2 MB cache holds: it
    spills them and reads them back (issue 4's gc benchmark: 20 s of SQL become 8 s).
    """
    if conn.dialect.name != "sqlite":
        return lambda: None
    before = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    conn.exec_driver_sql(f"PRAGMA cache_size = -{GC_CACHE_KIB}")
    return lambda: conn.exec_driver_sql(f"PRAGMA cache_size = {int(before)}")


def known_blob_ids(conn) -> set[str]:
    """The id of every blob row."""
    return {b for (b,) in conn.execute(select(schema.blobs.c.id))}


def still_named(conn, blob_ids: list[str]) -> set[str]:
    """Those of `blob_ids` that have a blob row (asked in batches: gc sweeps files a thousand at a time)."""
    b = schema.blobs
    return {bid for part in batches(blob_ids) for (bid,) in conn.execute(select(b.c.id).where(b.c.id.in_(part)))}


class Unreachable(NamedTuple):
    """What a gc would remove, counted without changing anything: snapshot ids, chunk keys, (blob id, bytes)."""

    snapshots: list[int]
    chunks: list[bytes]
    blobs: list[tuple[str, int]]
    known: set[str]  # every blob id the index records


def unreachable(conn, keep_last: int, agents: Iterable[str] | None) -> Unreachable:
    """What drop_unreachable would remove (and every known blob id), read in the caller's transaction.

    The doomed snapshots are excluded by their query, not by a list of their ids: a busy server's store
    has more than one statement may bind (65,535 parameters in PostgreSQL, 32,766 in SQLite)."""
    doomed = doomed_snapshots(conn, keep_last, agents)
    sc, cl, b = schema.snapshot_chunks, schema.chunk_layers, schema.blobs
    surviving = select(sc.c.chunk_key)
    if doomed:
        parts = [None] if agents is None else batches(sorted(set(agents)))
        for part in parts:
            surviving = surviving.where(not_(sc.c.snapshot_id.in_(doomed_snapshots_query(keep_last, part))))
    dead_chunks = [
        k for (k,) in conn.execute(select(schema.chunks.c.key).where(not_(schema.chunks.c.key.in_(surviving))))
    ]
    live_blobs = select(cl.c.blob_id).where(cl.c.chunk_key.in_(surviving))
    dead = [(bid, n) for bid, n in conn.execute(select(b.c.id, b.c.nbytes).where(not_(b.c.id.in_(live_blobs)))).all()]
    return Unreachable(doomed, dead_chunks, dead, known_blob_ids(conn))
