"""Byte counts kept in the index so that accounting never sums blobs at read time.

`chunks.nbytes` is the bytes of the distinct blobs a chunk's layer rows name (the layers of a
chunk usually share one blob). `chunks.prefix_bytes` is that plus the prefix bytes of its parent:
a chunk key names the chunk given its whole prefix, so the chunks before it are always the same
ones, and a snapshot's bytes are the prefix bytes of its last chunk.

A chunk's layer rows can change after it is first written (a sliding-window layer's fuller piece,
a state blob when another snapshot ends on the chunk, fsck dropping a damaged blob), so every
writer goes through `add_chains` or `refresh`, which carry a change down to the chunks after it.
fsck checks both columns (`check`) and `rebuild` recomputes them (fsck --repair).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, LargeBinary, MetaData, Table, and_, bindparam, select, text, update

from kvstore.index import db, schema
from kvstore.index.prepared import PreparedIn
from kvstore.index.queries import batches

__all__ = ["add_chains", "refresh", "check", "rebuild"]

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


def add_chains(
    conn,
    model_id: int,
    fingerprint: str,
    chains: list[list[bytes]],
    lengths: dict[bytes, int],
    layer_rows: list[dict],
    blob_bytes: dict[str, int],
) -> None:
    """Insert the chunk rows of `chains` and `layer_rows`, with their sizes, in the caller's write transaction.

    Each chain is a snapshot's chunk keys from chunk 0. Layer rows of chunks the index already
    has are added first (a row holding more of a chunk, a smaller `first`, replaces the stored one)
    and their sizes refreshed; then the new chunks go in with sizes taken from their layer rows.
    `blob_bytes` gives the size of every blob `layer_rows` name.
    """
    c, cl = schema.chunks, schema.chunk_layers
    root = bytes.fromhex(fingerprint)
    place: dict[bytes, tuple[int, bytes]] = {}  # key -> (seq, parent)
    for chain in chains:
        for i, key in enumerate(chain):
            place.setdefault(key, (i, chain[i - 1] if i else root))
    # Which chunks are stored, with their prefix bytes (a new chunk's parent may be one of them).
    stored = {bytes(k): int(p) for k, p in _PREFIX_BYTES_OF.rows(conn, list(place))}
    have = stored.keys()
    old_rows = [r for r in layer_rows if r["chunk_key"] in have]
    new_rows = [r for r in layer_rows if r["chunk_key"] not in have]
    if old_rows:
        db.insert_ignore(conn, cl, old_rows)
        for r in old_rows:  # a fuller piece of a sliding-window chunk replaces a partial one
            conn.execute(
                update(cl)
                .where(and_(cl.c.chunk_key == r["chunk_key"], cl.c.layer == r["layer"], cl.c.first > r["first"]))
                .values(blob_id=r["blob_id"], first=r["first"])
            )
        refresh(conn, {r["chunk_key"] for r in old_rows})
    fresh = [k for k in place if k not in have]
    if not fresh:
        return
    blobs_of: dict[bytes, set[str]] = {}
    for r in new_rows:
        blobs_of.setdefault(r["chunk_key"], set()).add(r["blob_id"])
    prefix: dict[bytes, int] = {root: 0}
    stored_parents = {place[k][1] for k in fresh} & have
    if old_rows:  # refresh() above may have changed the prefix bytes of stored chunks
        stored = {bytes(k): int(p) for k, p in _PREFIX_BYTES_OF.rows(conn, sorted(stored_parents))}
    prefix.update((k, stored[k]) for k in stored_parents)
    rows = []
    for key in sorted(fresh, key=lambda k: place[k][0]):  # parents before children
        seq, parent = place[key]
        nbytes = sum(blob_bytes[b] for b in blobs_of.get(key, ()))
        prefix[key] = prefix[parent] + nbytes
        rows.append(
            {
                "key": key,
                "model_id": model_id,
                "seq": seq,
                "length": lengths[key],
                "parent": parent,
                "nbytes": nbytes,
                "prefix_bytes": prefix[key],
            }
        )
    db.insert_ignore(conn, c, rows)
    db.insert_ignore(conn, cl, new_rows)


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
