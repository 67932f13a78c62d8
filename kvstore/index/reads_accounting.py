"""The accounting's reads: the store's counts and bytes, each head's bytes and shared prefix, a head's chunk map, models.

Plain SQL on a `reads.Reads`, so that it runs on a SQLAlchemy or a sqlite3 connection alike (a `Store` or a
`StoreReader`), over the columns the writers keep (kvstore.index.sizes): a handful of statements per call and no
blob sizes summed at read time. Each hands back typed rows; kvstore.ops.accounting turns them into reports.

A head's bytes are `chunks.prefix_bytes` of its last chunk. Because a chunk key names the chunk given its whole
prefix, two heads that share chunk i share chunks 0..i as well: the chunks of a head that other agents' heads
list are a leading run, found by a binary search per agent instead of a probe per chunk (`SHARED_DEPTH`), and
its shared bytes are the prefix bytes of the run's last chunk.
"""

from __future__ import annotations

from typing import NamedTuple

from kvstore.index.reads import Reads, scalar

__all__ = [
    "COUNTED",
    "SHARED_DEPTH",
    "StoreTotals",
    "HeadBytes",
    "AgentHead",
    "HeadChunk",
    "ModelRow",
    "totals",
    "head_chunk_bytes",
    "agent_names",
    "head_bytes",
    "agent_head",
    "head_chunks",
    "sharers",
    "models",
    "per_model",
    "model_names",
]

COUNTED = ("models", "agents", "snapshots", "chunks", "blobs")  # the tables whose rows the statistics count
PER_MODEL = ("agents", "snapshots", "chunks")  # the tables whose rows a model summary counts per model


class StoreTotals(NamedTuple):
    """The store's rows and bytes, from one read transaction."""

    counts: dict[str, int]  # rows per table of COUNTED
    bytes_on_disk: int  # every blob the index records
    logical_bytes: int  # every agent's head, as if each were stored apart


class HeadBytes(NamedTuple):
    """An agent's head snapshot in bytes."""

    name: str  # the agent's name
    total: int  # the bytes of every chunk the head lists
    shared: int  # the bytes of its leading chunks that another agent's head lists too


class AgentHead(NamedTuple):
    """An agent's row id and its head snapshot (None for an agent without one)."""

    id: int
    head: int | None


class HeadChunk(NamedTuple):
    """One chunk a snapshot lists, in order (0, 0 for a chunk the index lost the row of)."""

    seq: int  # its position in the snapshot
    length: int  # its tokens
    nbytes: int  # the bytes of its distinct blobs


class ModelRow(NamedTuple):
    """A model as its row holds it."""

    id: int
    fingerprint: str
    name: str | None  # the name hint, None when the store was never told one
    layout: str  # the cache layout, JSON text
    created: float


def _prefix_at(snap: str, seq: str) -> str:
    """SQL: the prefix bytes of chunk `seq` of snapshot `snap` (NULL when it lists no such chunk)."""
    return (
        f"(SELECT c.prefix_bytes FROM snapshot_chunks p JOIN chunks c ON c.key = p.chunk_key "
        f"WHERE p.snapshot_id = {snap} AND p.seq = {seq})"
    )


def _n_chunks(snap: str) -> str:
    """SQL: how many chunks snapshot `snap` lists (its last seq + 1: a seek, where COUNT(*) would scan)."""
    return f"(SELECT COALESCE(MAX(n.seq) + 1, 0) FROM snapshot_chunks n WHERE n.snapshot_id = {snap})"


def _shared_at(head: str, seq: str) -> str:
    """SQL: whether chunk `seq` of snapshot `head` is listed by another agent's head (`head` qualified: the
    agents table inside has a column of that name)."""
    return f"""EXISTS (SELECT 1 FROM snapshot_chunks x JOIN agent_chunks ac ON ac.chunk_key = x.chunk_key
               JOIN agents o ON o.id = ac.agent_id
               JOIN snapshot_chunks y ON y.snapshot_id = o.head AND y.seq = x.seq AND y.chunk_key = x.chunk_key
               WHERE x.snapshot_id = {head} AND x.seq = {seq} AND o.head <> {head})"""


# The next bounds of a binary search step, from `hit`: whether chunk (lo + hi) / 2 is shared.
_LO = "CASE WHEN hit THEN (lo + hi) / 2 + 1 ELSE lo END"
_HI = "CASE WHEN hit THEN hi ELSE (lo + hi) / 2 END"

# (agent id, depth): how many leading chunks of each agent's head other agents' heads list too.
# Binary search over [lo, hi): sharing is prefix-closed, so the predicate is monotone in seq. Each
# row carries the probe of its own midpoint, so every step runs it once (a CTE's recursive step
# cannot wrap itself in a subquery to share one).
SHARED_DEPTH = f"""
heads(aid, head, n) AS (
    SELECT a.id, a.head, {_n_chunks("a.head")} FROM agents a WHERE a.head IS NOT NULL {{where}}),
bs(aid, head, lo, hi, hit) AS (
    SELECT aid, head, 0, n, CASE WHEN n > 0 THEN {_shared_at("heads.head", "heads.n / 2")} ELSE FALSE END FROM heads
    UNION ALL
    SELECT aid, head, {_LO}, {_HI},
           CASE WHEN {_LO} < {_HI} THEN {_shared_at("bs.head", f"({_LO} + {_HI}) / 2")} ELSE FALSE END
    FROM bs WHERE lo < hi),
depth(aid, d) AS (SELECT aid, lo FROM bs WHERE lo = hi)"""

_LOGICAL = (
    f"SELECT COALESCE(SUM({_prefix_at('a.head', _n_chunks('a.head') + ' - 1')}), 0) "
    "FROM agents a WHERE a.head IS NOT NULL"
)

_HEAD_CHUNK_BYTES = (
    "SELECT COALESCE(SUM(c.nbytes), 0) FROM chunks c WHERE c.key IN "
    "(SELECT sc.chunk_key FROM snapshot_chunks sc JOIN agents a ON sc.snapshot_id = a.head)"
)

_HEAD_BYTES = f"""
        WITH RECURSIVE {SHARED_DEPTH}
        SELECT a.name, {_prefix_at("a.head", _n_chunks("a.head") + " - 1")}, {_prefix_at("a.head", "depth.d - 1")}
        FROM agents a JOIN depth ON depth.aid = a.id"""

_HEAD_CHUNKS = (
    "SELECT sc.seq, c.length, c.nbytes FROM snapshot_chunks sc "
    "LEFT JOIN chunks c ON c.key = sc.chunk_key WHERE sc.snapshot_id = :head ORDER BY sc.seq"
)

_SHARERS = (
    "SELECT x.seq, o.name FROM snapshot_chunks x JOIN agent_chunks ac ON ac.chunk_key = x.chunk_key "
    "JOIN agents o ON o.id = ac.agent_id "
    "JOIN snapshot_chunks y ON y.snapshot_id = o.head AND y.seq = x.seq AND y.chunk_key = x.chunk_key "
    "WHERE x.snapshot_id = :head AND o.id <> :aid ORDER BY x.seq, o.name"
)


def totals(conn: Reads) -> StoreTotals:
    """Rows per counted table, bytes on disk and logical bytes."""
    counts = {t: scalar(conn, f"SELECT COUNT(*) FROM {t}") for t in COUNTED}
    on_disk = scalar(conn, "SELECT COALESCE(SUM(nbytes), 0) FROM blobs")
    return StoreTotals(counts=counts, bytes_on_disk=int(on_disk), logical_bytes=int(scalar(conn, _LOGICAL)))


def head_chunk_bytes(conn: Reads) -> int:
    """Bytes of the distinct chunks the agents' heads list: each shared chunk once."""
    return int(scalar(conn, _HEAD_CHUNK_BYTES))


def agent_names(conn: Reads, name: str | None = None) -> list[str]:
    """Every agent's name, or [name] when there is such an agent (else [])."""
    if name is None:
        return [n for (n,) in conn.rows("SELECT a.name FROM agents a")]
    return [n for (n,) in conn.rows("SELECT a.name FROM agents a WHERE a.name = :name", {"name": name})]


def head_bytes(conn: Reads, *, name: str | None = None, half: int | None = None) -> list[HeadBytes]:
    """The head bytes of every agent with a head, of agent `name` only, or of the agents whose id is `half` mod 2."""
    where, params = "", {}
    if name is not None:
        where, params = "AND a.name = :name", {"name": name}
    elif half is not None:
        where = f"AND a.id % 2 = {int(half)}"
    return [
        HeadBytes(name=agent, total=int(total or 0), shared=int(shared or 0))
        for agent, total, shared in conn.rows(_HEAD_BYTES.format(where=where), params)
    ]


def agent_head(conn: Reads, name: str) -> AgentHead | None:
    """Agent `name`'s id and head, or None when there is no such agent."""
    found = conn.rows("SELECT id, head FROM agents a WHERE a.name = :name", {"name": name})
    return AgentHead(*found[0]) if found else None


def head_chunks(conn: Reads, head: int) -> list[HeadChunk]:
    """The chunks snapshot `head` lists, in order."""
    return [
        HeadChunk(seq=seq, length=int(length or 0), nbytes=int(nbytes or 0))
        for seq, length, nbytes in conn.rows(_HEAD_CHUNKS, {"head": head})
    ]


def sharers(conn: Reads, *, head: int, agent_id: int) -> dict[int, list[str]]:
    """seq -> the names (sorted) of the other agents whose head lists chunk `seq` of snapshot `head`."""
    out: dict[int, list[str]] = {}
    for seq, other in conn.rows(_SHARERS, {"head": head, "aid": agent_id}):
        out.setdefault(seq, []).append(other)
    return out


def models(conn: Reads) -> list[ModelRow]:
    """Every model, oldest first."""
    return [
        ModelRow(*r)
        for r in conn.rows("SELECT id, fingerprint, name, layout, created FROM models ORDER BY created, id")
    ]


def per_model(conn: Reads) -> dict[str, dict[int, int]]:
    """table -> model id -> its rows, for each table of PER_MODEL (a model with none is left out)."""
    return {t: dict(conn.rows(f"SELECT model_id, COUNT(*) FROM {t} GROUP BY model_id")) for t in PER_MODEL}


def model_names(conn: Reads) -> dict[str, str | None]:
    """fingerprint -> the model's name hint (None when the store was never told one)."""
    return dict(conn.rows("SELECT fingerprint, name FROM models"))
