"""The scans fsck checks the index with: every row as stored, whatever a damaged page made of its values.

Nothing here trusts a column's type: fsck (kvstore.ops.fsck) reports values that are not what their
column holds rather than crash on them. Its repairs write through kvstore.index.queries and
kvstore.index.commit, like every other writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any, NamedTuple

from sqlalchemy import func, select

from kvstore.index import schema
from kvstore.index.queries import batches

__all__ = [
    "SnapshotRow",
    "blob_rows",
    "model_fingerprints",
    "chunk_lists",
    "snapshot_rows",
    "unlisted_chunks",
    "dangling_heads",
    "agent_metas",
    "dangling_layers",
    "chunks_of_blobs",
    "snapshots_using",
    "unrecorded_listings",
    "stale_listings",
    "snapshot_tokens",
    "agent_names",
    "snapshot_agents",
]

_s, _sc, _m, _a, _cl, _b, _c, _ac = (
    schema.snapshots,
    schema.snapshot_chunks,
    schema.models,
    schema.agents,
    schema.chunk_layers,
    schema.blobs,
    schema.chunks,
    schema.agent_chunks,
)


class SnapshotRow(NamedTuple):
    """A snapshot's row as stored (a damaged page can hold any value in any column)."""

    id: Any
    model_id: Any
    n_tokens: Any
    tokens: Any


def blob_rows(conn) -> list[tuple[Any, Any]]:
    """(id, bytes) of every blob row."""
    return [tuple(r) for r in conn.execute(select(_b.c.id, _b.c.nbytes)).all()]


def model_fingerprints(conn) -> dict[Any, Any]:
    """{model row id: fingerprint} of every model row."""
    return dict(conn.execute(select(_m.c.id, _m.c.fingerprint)).all())


def chunk_lists(conn) -> dict[Any, list[bytes | None]]:
    """{snapshot id: its chunk keys in order} (None for a key that is not bytes)."""
    listed = conn.execute(select(_sc.c.snapshot_id, _sc.c.seq, _sc.c.chunk_key).order_by(_sc.c.snapshot_id, _sc.c.seq))
    return {
        sid: [r.chunk_key if isinstance(r.chunk_key, bytes) else None for r in rows]
        for sid, rows in groupby(listed, key=lambda r: r.snapshot_id)
    }


def snapshot_rows(conn) -> list[SnapshotRow]:
    """Every snapshot's id, model row, token count and token ids."""
    return [SnapshotRow(*r) for r in conn.execute(select(_s.c.id, _s.c.model_id, _s.c.n_tokens, _s.c.tokens))]


def unlisted_chunks(conn) -> list[tuple[Any, Any]]:
    """(snapshot id, chunk key) of every chunk-list entry whose chunk has no row."""
    known = select(schema.chunks.c.key)
    return [
        tuple(r) for r in conn.execute(select(_sc.c.snapshot_id, _sc.c.chunk_key).where(_sc.c.chunk_key.not_in(known)))
    ]


def dangling_heads(conn) -> list[tuple[Any, Any]]:
    """(agent name, head) of every agent whose head names no snapshot."""
    return [
        tuple(r)
        for r in conn.execute(
            select(_a.c.name, _a.c.head).where(_a.c.head.is_not(None), _a.c.head.not_in(select(_s.c.id)))
        )
    ]


def agent_metas(conn) -> list[tuple[Any, Any]]:
    """(name, metadata text) of every agent."""
    return [tuple(r) for r in conn.execute(select(_a.c.name, _a.c.meta))]


def dangling_layers(conn) -> list[tuple[Any, Any, Any]]:
    """(chunk key, layer, blob id) of every layer row whose blob has no row."""
    return [
        tuple(r)
        for r in conn.execute(
            select(_cl.c.chunk_key, _cl.c.layer, _cl.c.blob_id).where(_cl.c.blob_id.not_in(select(_b.c.id)))
        ).all()
    ]


def chunks_of_blobs(conn, blob_ids: Sequence[str]) -> list[bytes]:
    """The chunk keys of the layer rows naming these blobs."""
    out: list[bytes] = []
    for part in batches(blob_ids):
        out += [bytes(k) for (k,) in conn.execute(select(_cl.c.chunk_key).where(_cl.c.blob_id.in_(part)))]
    return out


def snapshots_using(conn, keys: Sequence[bytes]) -> set[int]:
    """The snapshots whose chunk lists name any of `keys` (of the agents agent_chunks says list them)."""
    out: set[int] = set()
    for part in batches(keys):
        owners = select(_ac.c.agent_id).where(_ac.c.chunk_key.in_(part))
        out |= {
            sid
            for (sid,) in conn.execute(
                select(_sc.c.snapshot_id)
                .select_from(_sc.join(_s, _s.c.id == _sc.c.snapshot_id))
                .where(_s.c.agent_id.in_(owners), _sc.c.chunk_key.in_(part))
            )
        }
    return out


def unrecorded_listings(conn) -> dict[Any, int]:
    """{agent id: how many chunks its snapshots list that agent_chunks does not record for it} (a gc would
    take those chunks for unlisted), of the chunks that have a row."""
    rows = conn.execute(
        select(_s.c.agent_id, _sc.c.chunk_key)
        .select_from(_sc.join(_s, _s.c.id == _sc.c.snapshot_id).join(_c, _c.c.key == _sc.c.chunk_key))
        .where(
            ~select(_ac.c.agent_id).where(_ac.c.chunk_key == _sc.c.chunk_key, _ac.c.agent_id == _s.c.agent_id).exists()
        )
        .distinct()
    )
    out: dict[Any, int] = {}
    for agent_id, _key in rows:
        out[agent_id] = out.get(agent_id, 0) + 1
    return out


def stale_listings(conn) -> dict[Any, int]:
    """{agent id: how many chunks agent_chunks records for it that none of its snapshots lists} (they
    would outlive their last snapshot until the agent is deleted)."""
    # A key has one place (chunks.seq): each snapshot is probed at it, not scanned (0.57 s of a 1.03 s fsck
    # for one chat of 512 snapshots when every list was scanned for every row).
    listed = (
        select(_sc.c.chunk_key)
        .select_from(_sc.join(_s, _s.c.id == _sc.c.snapshot_id))
        .where(_s.c.agent_id == _ac.c.agent_id, _sc.c.seq == _c.c.seq, _sc.c.chunk_key == _ac.c.chunk_key)
    )
    rows = conn.execute(
        select(_ac.c.agent_id, func.count())
        .select_from(_ac.join(_c, _c.c.key == _ac.c.chunk_key))
        .where(~listed.exists())
        .group_by(_ac.c.agent_id)
    )
    return dict(rows.all())


def snapshot_tokens(conn, snapshot_id: int) -> tuple[int, bytes]:
    """(model row id, token ids) of one snapshot."""
    row = conn.execute(select(_s.c.model_id, _s.c.tokens).where(_s.c.id == snapshot_id)).first()
    return row.model_id, row.tokens


def agent_names(conn, agent_ids: Sequence[Any]) -> dict[Any, str]:
    """{agent id: name} of these agents."""
    out: dict[Any, str] = {}
    for part in batches(list(agent_ids)):
        out.update(conn.execute(select(_a.c.id, _a.c.name).where(_a.c.id.in_(part))).all())
    return out


def snapshot_agents(conn, snapshot_ids: Sequence[Any]) -> set[Any]:
    """The agent ids of these snapshots."""
    out: set[Any] = set()
    for part in batches([i for i in snapshot_ids if isinstance(i, int)]):
        out |= {a for (a,) in conn.execute(select(_s.c.agent_id).where(_s.c.id.in_(part)))}
    return out
