"""Read-only views over the index: store statistics, per-agent byte accounting, chunk maps, models.

Everything here is SQL over columns the writers keep (kvstore.index.sizes), a handful of statements per
call and no blob sizes summed at read time. It is plain SQL run through `store.reading()`, so it reads a
`Store` (SQLAlchemy) and a `StoreReader` (sqlite3: the CLI's read commands) alike, without importing SQLAlchemy.

Accounting rules. A chunk's bytes are the bytes of the distinct blobs its layer rows name (the
layers of a chunk usually share one blob). An agent's bytes are the bytes of the chunks of its
head snapshot. A chunk is *shared* when another agent's head lists it too, else *unique* to the
agent: deleting the agent (and running gc) frees its unique bytes. Because a chunk key names
the chunk given its whole prefix, two heads that share chunk i share chunks 0..i as well: the
shared chunks of a head are a leading run, found by a binary search per agent instead of a
probe per chunk (see `SHARED_DEPTH`). So a head's bytes are `chunks.prefix_bytes` of its last
chunk, its shared bytes the prefix bytes of its last shared chunk, and its unique bytes the rest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvstore.errors import UnknownAgentError
from kvstore.formats import FORMAT_VERSION
from kvstore.index import reads
from kvstore.index.translate import parse_json
from kvstore.names import validate_name
from kvstore.records import Stats

if TYPE_CHECKING:
    from kvstore.store_reads import StoreReads as Store  # a Store or a StoreReader

__all__ = ["store_stats", "agent_bytes", "chunk_runs", "model_summary", "model_names"]


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
    """SQL: whether chunk `seq` of snapshot `head` is listed by another agent's head."""
    return f"""EXISTS (SELECT 1 FROM snapshot_chunks x JOIN snapshot_chunks y ON y.chunk_key = x.chunk_key
               WHERE x.snapshot_id = {head} AND x.seq = {seq} AND y.snapshot_id <> {head}
                 AND y.snapshot_id IN (SELECT head FROM agents WHERE head IS NOT NULL))"""


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
    SELECT aid, head, 0, n, CASE WHEN n > 0 THEN {_shared_at("head", "n / 2")} ELSE FALSE END FROM heads
    UNION ALL
    SELECT aid, head, {_LO}, {_HI},
           CASE WHEN {_LO} < {_HI} THEN {_shared_at("head", f"({_LO} + {_HI}) / 2")} ELSE FALSE END
    FROM bs WHERE lo < hi),
depth(aid, d) AS (SELECT aid, lo FROM bs WHERE lo = hi)"""


COUNTED = ("models", "agents", "snapshots", "chunks", "blobs")


def store_stats(store: Store) -> Stats:
    """Counts, bytes on disk (every blob the index records), logical bytes (every head, stored apart)."""
    with store.reading("reading statistics") as conn:
        counts = {t: reads.scalar(conn, f"SELECT COUNT(*) FROM {t}") for t in COUNTED}
        on_disk = reads.scalar(conn, "SELECT COALESCE(SUM(nbytes), 0) FROM blobs")
        logical = reads.scalar(
            conn,
            f"SELECT COALESCE(SUM({_prefix_at('a.head', _n_chunks('a.head') + ' - 1')}), 0) "
            "FROM agents a WHERE a.head IS NOT NULL",
        )
    on_disk, logical = int(on_disk), int(logical)
    return Stats(
        path=str(store.path),
        url=store.shown_url,
        format_version=FORMAT_VERSION,
        schema_revision=store.schema_revision,
        chunk_size=store.chunk_size,
        models=counts["models"],
        agents=counts["agents"],
        snapshots=counts["snapshots"],
        chunks=counts["chunks"],
        blobs=counts["blobs"],
        bytes_on_disk=on_disk,
        logical_bytes=logical,
        dedup_ratio=round(logical / on_disk, 4) if on_disk else 1.0,
    )


def head_chunk_bytes(store: Store) -> int:
    """Bytes of the distinct chunks the agents' heads list: each shared chunk once (what the heads need on disk)."""
    with store.reading("reading statistics") as conn:
        return int(
            reads.scalar(
                conn,
                "SELECT COALESCE(SUM(c.nbytes), 0) FROM chunks c WHERE c.key IN "
                "(SELECT sc.chunk_key FROM snapshot_chunks sc JOIN agents a ON sc.snapshot_id = a.head)",
            )
        )


PARALLEL_AGENTS = 2000  # from this many agents on, the accounting runs as two halves on two connections


def _agent_rows(conn, where: str, params: dict) -> list:
    """(name, head bytes, shared prefix bytes) of the agents `where` selects."""
    return conn.rows(
        f"""
        WITH RECURSIVE {SHARED_DEPTH.format(where=where)}
        SELECT a.name, {_prefix_at("a.head", _n_chunks("a.head") + " - 1")}, {_prefix_at("a.head", "depth.d - 1")}
        FROM agents a JOIN depth ON depth.aid = a.id""",
        params,
    )


def _agent_half(store: Store, k: int) -> list:
    with store.reading("accounting bytes") as conn:
        return _agent_rows(conn, f"AND a.id % 2 = {k}", {})


def agent_bytes(store: Store, name: str | None = None) -> dict[str, dict[str, int]]:
    """Per agent (or just `name`): {"unique_bytes", "shared_bytes", "total_bytes"} of its head snapshot."""
    where, params = "", {}
    if name is not None:
        validate_name(name)
        where, params = "AND a.name = :name", {"name": name}
    with store.reading("accounting bytes") as conn:
        one = "" if name is None else " WHERE a.name = :name"
        names = [n for (n,) in conn.rows("SELECT a.name FROM agents a" + one, params)]
        if name is not None and not names:
            raise UnknownAgentError(f"no agent named {name!r} in this store")
        parallel = name is None and len(names) >= PARALLEL_AGENTS and store.io_threads > 1
        rows = [] if parallel else _agent_rows(conn, where, params)
    if parallel:
        # The binary searches are independent per agent and the database drivers release the GIL while a
        # statement runs: two halves on two connections use two cores. (Like any report, each half is
        # one consistent read; a save committing in between can show in one half only.)
        with ThreadPoolExecutor(max_workers=2) as pool:
            rows = [r for part in pool.map(lambda k: _agent_half(store, k), (0, 1)) for r in part]
    out = {n: {"unique_bytes": 0, "shared_bytes": 0, "total_bytes": 0} for n in names}
    for agent, total, shared in rows:
        total, shared = int(total or 0), int(shared or 0)
        out[agent] = {"unique_bytes": total - shared, "shared_bytes": shared, "total_bytes": total}
    return out


def chunk_runs(store: Store, name: str) -> list[dict]:
    """The chunk map of an agent's head: runs of consecutive chunks that the same other agents share.

    Each run: first and last chunk index, token range [start, end), chunk count, bytes, and the
    names of the other agents whose head lists every chunk of the run.
    """
    validate_name(name)
    with store.reading(f"mapping agent {name!r}") as conn:
        found = conn.rows("SELECT id, head FROM agents a WHERE a.name = :name", {"name": name})
        if not found:
            raise UnknownAgentError(f"no agent named {name!r} in this store")
        agent_id, head = found[0]
        if head is None:
            return []
        chunks = conn.rows(
            "SELECT sc.seq, c.length, c.nbytes FROM snapshot_chunks sc "
            "LEFT JOIN chunks c ON c.key = sc.chunk_key WHERE sc.snapshot_id = :head ORDER BY sc.seq",
            {"head": head},
        )
        sharers: dict[int, list[str]] = {}
        for seq, other in conn.rows(
            "SELECT x.seq, o.name FROM snapshot_chunks x JOIN snapshot_chunks y ON y.chunk_key = x.chunk_key "
            "JOIN agents o ON o.head = y.snapshot_id "
            "WHERE x.snapshot_id = :head AND o.id <> :aid ORDER BY x.seq, o.name",
            {"head": head, "aid": agent_id},
        ):
            sharers.setdefault(seq, []).append(other)
    runs: list[dict] = []
    for seq, length, nbytes in chunks:
        start = seq * store.chunk_size  # every chunk but the last is full
        who = sharers.get(seq, [])
        if runs and runs[-1]["shared_with"] == who and runs[-1]["last"] == seq - 1:
            run = runs[-1]
            run.update(
                last=seq, end=start + int(length or 0), chunks=run["chunks"] + 1, bytes=run["bytes"] + int(nbytes or 0)
            )
        else:
            runs.append(
                {
                    "first": seq,
                    "last": seq,
                    "start": start,
                    "end": start + int(length or 0),
                    "chunks": 1,
                    "bytes": int(nbytes or 0),
                    "shared_with": who,
                }
            )
    return runs


def model_summary(store: Store) -> list[dict]:
    """Every model the store knows: fingerprint, name hint, layer layout, and its agents, snapshots and chunks."""
    with store.reading("listing models") as conn:
        models = conn.rows("SELECT id, fingerprint, name, layout, created FROM models ORDER BY created, id")
        per = {
            table: dict(conn.rows(f"SELECT model_id, COUNT(*) FROM {table} GROUP BY model_id"))
            for table in ("agents", "snapshots", "chunks")
        }
    out = []
    for mid, fp, hint, layout, created in models:
        slots = parse_json(layout, f"model {fp}'s cache layout").get("slots", [])
        kinds: dict[str, int] = {}
        for cls, _kind, _params in slots:
            kinds[cls] = kinds.get(cls, 0) + 1
        out.append(
            {
                "fingerprint": fp,
                "name": hint,
                "created": created,
                "layers": len(slots),
                "cache_classes": kinds,
                "agents": per["agents"].get(mid, 0),
                "snapshots": per["snapshots"].get(mid, 0),
                "chunks": per["chunks"].get(mid, 0),
            }
        )
    return out


def model_names(store: Store) -> dict[str, str | None]:
    """fingerprint -> the model's name hint (None when the store was never told one): one small query."""
    with store.reading("listing models") as conn:
        return dict(conn.rows("SELECT fingerprint, name FROM models"))
