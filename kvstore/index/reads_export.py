"""An export's reads: one agent's rows and every row its snapshots need, read in the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from kvstore.index import queries, schema
from kvstore.index.queries import batches
from kvstore.index.reads_restore import head_snapshot

__all__ = ["AgentRows", "agent_rows"]


@dataclass(frozen=True, slots=True)
class AgentRows:
    """One agent's rows as the index holds them: what an archive of it is made of."""

    agent: Any  # the agents row (every column)
    model: Any  # its models row (every column)
    real: str | None  # the model an unverified import's namespace stands for, else None
    snapshots: list  # its snapshots rows (every column), oldest first
    lists: dict[int, list[bytes]]  # snapshot id -> its chunk keys, in order
    chunks: list  # (key, seq, length) of every chunk they list
    layers: list  # (chunk_key, layer, blob_id, first) of those chunks
    blobs: list  # (id, nbytes) of the blobs those layers name


def agent_rows(conn, name: str) -> AgentRows:
    """The rows of agent `name`; UnknownAgentError for no agent, or one with no snapshot to move."""
    a, m, s, sc, c, cl, b = (
        schema.agents,
        schema.models,
        schema.snapshots,
        schema.snapshot_chunks,
        schema.chunks,
        schema.chunk_layers,
        schema.blobs,
    )
    head_snapshot(conn, name)
    agent = conn.execute(select(a).where(a.c.name == name)).first()
    model = conn.execute(select(m).where(m.c.id == agent.model_id)).first()
    real = queries.namespace_model(conn, model.fingerprint)
    snaps = conn.execute(select(s).where(s.c.agent_id == agent.id).order_by(s.c.id)).all()
    lists: dict[int, list[bytes]] = {sn.id: [] for sn in snaps}
    # Listed by agent, not by a list of its snapshot ids: it may have more snapshots than a statement can bind.
    for sid, key in conn.execute(
        select(sc.c.snapshot_id, sc.c.chunk_key)
        .select_from(sc.join(s, s.c.id == sc.c.snapshot_id))
        .where(s.c.agent_id == agent.id)
        .order_by(sc.c.snapshot_id, sc.c.seq)
    ):
        lists[sid].append(bytes(key))
    keys = sorted({k for ks in lists.values() for k in ks})
    chunk_rows, layer_rows = [], []
    for part in batches(keys):
        chunk_rows += conn.execute(select(c.c.key, c.c.seq, c.c.length).where(c.c.key.in_(part))).all()
        layer_rows += conn.execute(
            select(cl.c.chunk_key, cl.c.layer, cl.c.blob_id, cl.c.first).where(cl.c.chunk_key.in_(part))
        ).all()
    blob_ids = sorted({r.blob_id for r in layer_rows})
    blob_rows = []
    for part in batches(blob_ids):
        blob_rows += conn.execute(select(b.c.id, b.c.nbytes).where(b.c.id.in_(part))).all()
    return AgentRows(agent, model, real, snaps, lists, chunk_rows, layer_rows, blob_rows)
