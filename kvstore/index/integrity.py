"""The scans fsck checks the index with: every row as stored, whatever a damaged page made of its values.

Nothing here trusts a column's type: fsck (kvstore.ops.fsck) reports values that are not what their
column holds rather than crash on them. Its repairs write through kvstore.index.queries and
kvstore.index.commit, like every other writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any, NamedTuple

from sqlalchemy import select

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
    "snapshot_tokens",
]

_s, _sc, _m, _a, _cl, _b = (
    schema.snapshots,
    schema.snapshot_chunks,
    schema.models,
    schema.agents,
    schema.chunk_layers,
    schema.blobs,
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
    """The snapshots whose chunk lists name any of `keys`."""
    out: set[int] = set()
    for part in batches(keys):
        out |= {sid for (sid,) in conn.execute(select(_sc.c.snapshot_id).where(_sc.c.chunk_key.in_(part)))}
    return out


def snapshot_tokens(conn, snapshot_id: int) -> tuple[int, bytes]:
    """(model row id, token ids) of one snapshot."""
    row = conn.execute(select(_s.c.model_id, _s.c.tokens).where(_s.c.id == snapshot_id)).first()
    return row.model_id, row.tokens
