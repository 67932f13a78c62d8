"""agent_chunks: which agents' snapshots list each chunk (revision 0005), kept equal to the chunk lists.

The lookups by chunk (gc's reachability, sharing, a match's token check) read it instead of an index of
snapshot_chunks by chunk, which took a page write for each chunk of the history on every turn's save.
A save adds rows for the chunks new to the agent (`queries.insert_snapshot`); gc's retention and fsck's
re-listing drop the rows no snapshot of the agent lists any more; fsck checks it both ways
(kvstore.index.integrity) and its repair rebuilds it. Each runs in the caller's write transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, delete, select

from kvstore.index import db, schema
from kvstore.index.prepared import Prepared

__all__ = ["list_chunks", "rebuild", "unlist"]

_ac, _sc, _s, _c = schema.agent_chunks, schema.snapshot_chunks, schema.snapshots, schema.chunks


def list_chunks(conn, agent_id: int, keys: Sequence[bytes]) -> None:
    """Record that a snapshot of agent `agent_id` lists these chunks (a row for each one new to the agent;
    the others are found and skipped without a write)."""
    db.insert_ignore(conn, _ac, [{"chunk_key": k, "agent_id": agent_id} for k in keys])


def _listed(agent_id):
    return (
        select(_sc.c.chunk_key).select_from(_sc.join(_s, _s.c.id == _sc.c.snapshot_id)).where(_s.c.agent_id == agent_id)
    )


# One statement compiled once and run for every agent (gc's retention prunes thousands at a time).
_UNLIST = Prepared(
    lambda _d: delete(_ac).where(
        _ac.c.agent_id == bindparam("agent_id"), _ac.c.chunk_key.not_in(_listed(bindparam("agent_id")))
    )
)


def unlist(conn, agent_ids: Sequence[int]) -> None:
    """Drop the rows of these agents whose chunk none of the agent's snapshots lists any more."""
    _UNLIST.many(conn, [{"agent_id": a} for a in sorted(set(agent_ids))])


def rebuild(conn, agent_ids: Sequence[int]) -> None:
    """The rows of these agents, rebuilt from their snapshots' chunk lists (of the chunks that have a row)."""
    for agent_id in sorted(set(agent_ids)):
        keys = conn.execute(_listed(agent_id).join(_c, _c.c.key == _sc.c.chunk_key).distinct())
        list_chunks(conn, agent_id, [bytes(k) for (k,) in keys])
    unlist(conn, agent_ids)
