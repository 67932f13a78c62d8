"""Read-only views over the index: store statistics and per-agent byte accounting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import func, select

from . import db, schema
from .formats import FORMAT_VERSION
from .records import Stats

if TYPE_CHECKING:
    from .store import Store


def _count(conn, table) -> int:
    return conn.execute(select(func.count()).select_from(table)).scalar_one()


def head_bytes_query():
    """(agent name, chunk key, blob id, nbytes) of every blob of every agent's head snapshot.

    Distinct: the layers of a chunk share one blob, which counts once.
    """
    a, sc, cl, b = schema.agents, schema.snapshot_chunks, schema.chunk_layers, schema.blobs
    return (select(a.c.name, sc.c.chunk_key, cl.c.blob_id, b.c.nbytes)
            .select_from(a.join(sc, sc.c.snapshot_id == a.c.head)
                         .join(cl, cl.c.chunk_key == sc.c.chunk_key)
                         .join(b, b.c.id == cl.c.blob_id)).distinct())


def store_stats(store: "Store") -> Stats:
    with db.transaction(store.engine, write=False, what="reading statistics") as conn:
        counts = {t.name: _count(conn, t) for t in (schema.models, schema.agents, schema.snapshots,
                                                     schema.chunks, schema.blobs)}
        on_disk = conn.execute(select(func.coalesce(func.sum(schema.blobs.c.nbytes), 0))).scalar_one()
        hb = head_bytes_query().subquery()
        logical = conn.execute(select(func.coalesce(func.sum(hb.c.nbytes), 0))).scalar_one()
    return Stats(path=str(store.path), url=store.engine.url.render_as_string(hide_password=True),
                 format_version=FORMAT_VERSION, schema_revision=store.schema_revision,
                 chunk_size=store.chunk_size, models=counts["models"], agents=counts["agents"],
                 snapshots=counts["snapshots"], chunks=counts["chunks"], blobs=counts["blobs"],
                 bytes_on_disk=int(on_disk), logical_bytes=int(logical),
                 dedup_ratio=round(logical / on_disk, 4) if on_disk else 1.0)


def agent_bytes(store: "Store") -> dict[str, dict[str, int]]:
    """Per agent: bytes of its head's blobs that no other agent's head uses (unique) and that others use (shared)."""
    users: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    per_agent: dict[str, set[str]] = {}
    with db.transaction(store.engine, write=False, what="accounting bytes") as conn:
        for name, _key, blob_id, nbytes in conn.execute(head_bytes_query()):
            users.setdefault(blob_id, set()).add(name)
            sizes[blob_id] = int(nbytes)
            per_agent.setdefault(name, set()).add(blob_id)
        names = [n for (n,) in conn.execute(select(schema.agents.c.name))]
    out = {}
    for name in names:
        blobs = per_agent.get(name, set())
        unique = sum(sizes[b] for b in blobs if len(users[b]) == 1)
        shared = sum(sizes[b] for b in blobs if len(users[b]) > 1)
        out[name] = {"unique_bytes": unique, "shared_bytes": shared, "total_bytes": unique + shared}
    return out
