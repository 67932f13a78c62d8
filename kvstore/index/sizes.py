"""Byte counts kept in the index so that accounting never sums blobs at read time.

`chunks.nbytes` is the bytes of the distinct blobs a chunk's layer rows name (the layers of a
chunk usually share one blob). `chunks.prefix_bytes` is that plus the prefix bytes of its parent:
a chunk key names the chunk given its whole prefix, so the chunks before it are always the same
ones, and a snapshot's bytes are the prefix bytes of its last chunk.

A chunk's layer rows can change after it is first written (a sliding-window layer's fuller piece,
a state blob when another snapshot ends on the chunk, fsck dropping a damaged blob), so every
writer goes through kvstore.index.commit (new chunks get their sizes as they go in) or `refresh`,
which carries a change down to the chunks after it.
fsck checks both columns (`check`) and `rebuild` recomputes them (fsck --repair).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, LargeBinary, MetaData, Table, bindparam, select, text, update

from kvstore.index import schema
from kvstore.index.prepared import PreparedIn
from kvstore.index.queries import batches

__all__ = ["prefix_bytes", "refresh", "check", "rebuild"]

# Bytes of chunk `c.key`: IN (...) keeps one blob shared by several layers from counting twice.
CHUNK_BYTES = (
    "(SELECT COALESCE(SUM(b.nbytes), 0) FROM blobs b WHERE b.id IN "
    "(SELECT cl.blob_id FROM chunk_layers cl WHERE cl.chunk_key = c.key))"
)

# Adds :delta to the prefix bytes of chunk :key and of every chunk after it on any chain.
# `seq = sub.seq + 1` bounds the walk even on a damaged index whose parent links loop.
_CARRY = text("""
    WITH RECURSIVE sub(key, seq) AS (
        SELECT c.key, c.seq FROM chunks c WHERE c.key = :key
        UNION ALL
        SELECT c.key, c.seq FROM chunks c JOIN sub ON c.parent = sub.key AND c.seq = sub.seq + 1)
    UPDATE chunks SET prefix_bytes = prefix_bytes + :delta WHERE key IN (SELECT key FROM sub)""")

_c = schema.chunks
_PREFIX_BYTES_OF = PreparedIn(lambda keys: select(_c.c.key, _c.c.prefix_bytes).where(_c.c.key.in_(keys)))


def prefix_bytes(conn, keys: list[bytes]) -> dict[bytes, int]:
    """{key: prefix bytes} of the chunks among `keys` that the index has."""
    return {bytes(k): int(p) for k, p in _PREFIX_BYTES_OF.rows(conn, keys)}


def refresh(conn, keys) -> dict[bytes, int]:
    """Recompute `nbytes` of these chunks from their layer rows and carry each change down the chains.

    Call it in the write transaction that changed their layer rows. Returns {key: change in bytes}.
    """
    changed: dict[bytes, int] = {}
    q = text(f"SELECT c.key, c.nbytes, {CHUNK_BYTES} FROM chunks c WHERE c.key IN :keys").bindparams(
        bindparam("keys", expanding=True, type_=LargeBinary)
    )
    for part in batches(sorted(set(keys))):
        for key, old, new in conn.execute(q, {"keys": part}):
            if int(old) != int(new):
                changed[bytes(key)] = int(new) - int(old)
    c = schema.chunks
    for key, delta in changed.items():
        conn.execute(update(c).where(c.c.key == key).values(nbytes=c.c.nbytes + delta))
        conn.execute(_CARRY.bindparams(bindparam("key", type_=LargeBinary)), {"key": key, "delta": delta})
    return changed


def check(conn) -> list[tuple[bytes, str, int, int]]:
    """Chunks whose recorded sizes disagree with their blobs: (key, column, recorded, expected).

    A prefix is checked against the parent's recorded prefix, so one wrong chunk is reported once,
    not along with every chunk after it. A chunk whose parent row is gone (garbage awaiting gc) is
    not checked for its prefix.
    """
    out = [
        (bytes(k), "nbytes", int(got), int(want))
        for k, got, want in conn.execute(
            text(
                f"SELECT key, nbytes, want FROM (SELECT c.key, c.nbytes, {CHUNK_BYTES} AS want FROM chunks c) sized "
                "WHERE nbytes <> want"
            )
        )
    ]
    out += [
        (bytes(k), "prefix_bytes", int(got), int(want))
        for k, got, want in conn.execute(
            text(
                "SELECT c.key, c.prefix_bytes, c.nbytes + COALESCE(p.prefix_bytes, 0) FROM chunks c "
                "LEFT JOIN chunks p ON p.key = c.parent AND p.seq = c.seq - 1 "
                "WHERE (c.seq = 0 OR p.key IS NOT NULL) AND c.prefix_bytes <> c.nbytes + COALESCE(p.prefix_bytes, 0)"
            )
        )
    ]
    return out


def rebuild(conn) -> None:
    """Recompute both columns of every chunk from the layer rows and blob sizes (fsck --repair)."""
    conn.execute(
        text(
            f"UPDATE chunks SET nbytes = {CHUNK_BYTES.replace('c.key', 'chunks.key')} "
            f"WHERE nbytes <> {CHUNK_BYTES.replace('c.key', 'chunks.key')}"
        )
    )
    # Prefixes walk each tree of chunks from its chunk 0 into a temporary table, then go back in one
    # UPDATE: a recursive CTE inside the UPDATE's subquery could be evaluated once per row.
    walk = Table(
        "kvstore_prefix_walk",
        MetaData(),
        Column("key", LargeBinary(16), primary_key=True),
        Column("total", BigInteger, nullable=False),
        prefixes=["TEMPORARY"],
    )
    walk.drop(conn, checkfirst=True)
    walk.create(conn)
    conn.execute(
        text("""
        WITH RECURSIVE w(key, seq, total) AS (
            SELECT key, seq, nbytes FROM chunks WHERE seq = 0
            UNION ALL
            SELECT c.key, c.seq, w.total + c.nbytes FROM chunks c JOIN w ON c.parent = w.key AND c.seq = w.seq + 1)
        INSERT INTO kvstore_prefix_walk (key, total) SELECT key, total FROM w""")
    )
    total = "(SELECT t.total FROM kvstore_prefix_walk t WHERE t.key = chunks.key)"
    conn.execute(
        text(f"UPDATE chunks SET prefix_bytes = {total} WHERE prefix_bytes <> COALESCE({total}, prefix_bytes)")
    )
    walk.drop(conn)
