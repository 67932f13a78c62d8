"""The read path's queries: a snapshot and its pieces, the pieces of chunk keys, stored tails, token checks.

Each runs in the caller's read transaction (`db.transaction(write=False)`) and hands back the typed rows
of kvstore.index.rows; kvstore.ops.plan plans over them and kvstore.ops.restore reads the blobs.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby

from sqlalchemy import bindparam, select, text

from kvstore.errors import UnknownAgentError
from kvstore.index import queries, schema
from kvstore.index.prepared import Prepared
from kvstore.index.queries import batches
from kvstore.index.rows import Layers, SnapshotOwner, SnapshotRow, TailRow

__all__ = [
    "layers",
    "checked_layers",
    "snapshot_layers",
    "head_snapshot",
    "blob_named",
    "stored_tails",
    "listed_tokens",
    "snapshot_owners",
    "chunk_lists",
]

_a, _m, _s, _sc, _c, _cl, _ac = (
    schema.agents,
    schema.models,
    schema.snapshots,
    schema.snapshot_chunks,
    schema.chunks,
    schema.chunk_layers,
    schema.agent_chunks,
)


def layers(conn, keys: list[bytes]) -> Layers:
    """The pieces stored for the given chunk keys."""
    out = {}
    for part in batches(keys):
        rows = conn.execute(  # .all(): one fetch, not one per row (a row per chunk and layer)
            select(_cl.c.chunk_key, _cl.c.layer, _cl.c.blob_id, _cl.c.first).where(_cl.c.chunk_key.in_(part))
        ).all()
        out.update({(bytes(k), layer): (blob_id, first) for k, layer, blob_id, first in rows})
    return out


def checked_layers(conn, keys: Iterable[bytes]) -> Layers:
    """layers() of these keys, leaving out rows whose values a damaged page made into no plan (fsck measures)."""
    out = {}
    for part in batches(sorted(keys)):
        rows = conn.execute(
            select(_cl.c.chunk_key, _cl.c.layer, _cl.c.blob_id, _cl.c.first).where(_cl.c.chunk_key.in_(part))
        ).all()
        out.update(
            ((bytes(k), layer), (blob_id, first))
            for k, layer, blob_id, first in rows
            if isinstance(layer, int) and isinstance(first, int)
        )
    return out


_SNAPSHOT_LAYERS = Prepared(
    lambda _d: (
        select(_sc.c.seq, _sc.c.chunk_key, _cl.c.layer, _cl.c.blob_id, _cl.c.first)
        .select_from(_sc.outerjoin(_cl, _cl.c.chunk_key == _sc.c.chunk_key))
        .where(_sc.c.snapshot_id == bindparam("snapshot_id"))
        .order_by(_sc.c.seq)
    )
)


def snapshot_layers(conn, snapshot_id: int) -> tuple[list[bytes], Layers]:
    """A snapshot's chunk keys in order, and the pieces stored for them, in one query (a load's largest)."""
    rows = _SNAPSHOT_LAYERS.rows(conn, snapshot_id=snapshot_id)
    keys: dict[int, bytes] = {}
    out = {}
    for seq, key, layer, blob_id, first in rows:
        key = keys.get(seq) or keys.setdefault(seq, bytes(key))
        if layer is not None:  # a chunk whose layers fsck --repair removed: load reports it
            out[(key, layer)] = (blob_id, first)
    return list(keys.values()), out


def _snapshot_query(which):
    return Prepared(
        lambda _d: (
            select(_s.c.id, _s.c.n_tokens, _s.c.tokens, _m.c.fingerprint, _m.c.layout, _a.c.name, _a.c.meta)
            .select_from(_a.join(_s, _s.c.agent_id == _a.c.id).join(_m, _s.c.model_id == _m.c.id))
            .where(_a.c.name == bindparam("name"), which(_s, _a))
        )
    )


_HEAD_SNAPSHOT = _snapshot_query(lambda s, a: s.c.id == a.c.head)
_NAMED_SNAPSHOT = _snapshot_query(lambda s, _a: s.c.id == bindparam("snapshot_id"))


def head_snapshot(conn, name: str, snapshot_id: int | None = None) -> SnapshotRow:
    """Agent `name`'s head snapshot (or its snapshot `snapshot_id`); UnknownAgentError if there is none."""
    if snapshot_id is None:
        row = _HEAD_SNAPSHOT.first(conn, name=name)
    else:
        row = _NAMED_SNAPSHOT.first(conn, name=name, snapshot_id=snapshot_id)
    if row is not None:
        return SnapshotRow(*row)
    if queries.agent_row(conn, name) is None:
        raise UnknownAgentError(f"no agent named {name!r} in this store")
    raise UnknownAgentError(
        f"agent {name!r} has no snapshot {snapshot_id}"
        if snapshot_id is not None
        else f"agent {name!r} has no saved snapshot"
    )


def blob_named(conn, blob_id: str) -> bool:
    """Whether a layer row still names the blob."""
    return conn.execute(select(_cl.c.layer).where(_cl.c.blob_id == blob_id).limit(1)).first() is not None


def stored_tails(conn, parents: Iterable[bytes], chunk_size: int) -> list[TailRow]:
    """The stored partial chunks (shorter than chunk_size) whose parent is one of `parents`."""
    out = []
    for part in batches(parents):
        out += [
            TailRow(bytes(key), length, bytes(parent), seq)
            for key, length, parent, seq in conn.execute(
                select(_c.c.key, _c.c.length, _c.c.parent, _c.c.seq).where(
                    _c.c.parent.in_(part), _c.c.length < chunk_size
                )
            ).all()
        ]
    return out


# The newest snapshot of the first agent agent_chunks names: every agent it names lists the chunk, and its
# newest snapshots most likely do (a late chunk of a long chat is in none of its first snapshots).
_LISTED_TOKENS = Prepared(
    lambda _d: text(
        """SELECT (SELECT s.tokens FROM snapshots s JOIN snapshot_chunks sc
                   ON sc.snapshot_id = s.id AND sc.seq = :seq AND sc.chunk_key = ac.chunk_key
                   WHERE s.agent_id = ac.agent_id ORDER BY s.id DESC LIMIT 1)
           FROM agent_chunks ac WHERE ac.chunk_key = :key LIMIT 1"""
    )
)


def listed_tokens(conn, key: bytes, seq: int) -> bytes | None:
    """The token ids of a snapshot that lists chunk `key` at position `seq`, or None if none does."""
    return _LISTED_TOKENS.scalar(conn, key=key, seq=seq)


def snapshot_owners(conn, snapshot_ids: list[int]) -> dict[int, SnapshotOwner]:
    """{snapshot id: its owner row} of these snapshots, the values as the rows hold them."""
    out = {}
    for part in batches(snapshot_ids):
        out.update(
            (r[0], SnapshotOwner(*r))
            for r in conn.execute(
                select(_s.c.id, _s.c.n_tokens, _a.c.name, _a.c.head, _m.c.layout)
                .select_from(_s.join(_a, _s.c.agent_id == _a.c.id).join(_m, _s.c.model_id == _m.c.id))
                .where(_s.c.id.in_(part))
            ).all()
        )
    return out


def chunk_lists(conn, snapshot_ids: list[int]) -> dict[int, list]:
    """{snapshot id: its chunk keys in order}, the values as the rows hold them (a damaged page's too)."""
    out = {}
    for part in batches(snapshot_ids):
        listed = conn.execute(
            select(_sc.c.snapshot_id, _sc.c.chunk_key)
            .where(_sc.c.snapshot_id.in_(part))
            .order_by(_sc.c.snapshot_id, _sc.c.seq)
        )
        out.update((sid, [k for _, k in group]) for sid, group in groupby(listed, key=lambda r: r[0]))
    return out
