"""Read-only views over the index: store statistics, per-agent byte accounting, chunk maps, models.

The statements are kvstore.index.reads_accounting's plain SQL, run through `store.reading()`, so these read a
`Store` (SQLAlchemy) and a `StoreReader` (sqlite3: the CLI's read commands) alike, without importing SQLAlchemy.
This module holds what is done with the rows: the reports, and the accounting split over two connections.

Accounting rules. A chunk's bytes are the bytes of the distinct blobs its layer rows name (the
layers of a chunk usually share one blob). An agent's bytes are the bytes of the chunks of its
head snapshot. A chunk is *shared* when another agent's head lists it too, else *unique* to the
agent: deleting the agent (and running gc) frees its unique bytes. Sharing is prefix-closed (a
chunk key names the chunk given its whole prefix), so a head's shared chunks are a leading run:
its unique bytes are its bytes less the prefix bytes of that run (see reads_accounting).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvstore.errors import UnknownAgentError
from kvstore.formats import FORMAT_VERSION
from kvstore.index import reads_accounting as q
from kvstore.index.translate import parse_json
from kvstore.names import validate_name
from kvstore.records import Stats

if TYPE_CHECKING:
    from kvstore.ops.parts import Described, Reading  # a Store or the CLI's StoreReader

__all__ = ["store_stats", "agent_bytes", "chunk_runs", "model_summary", "model_names"]


def store_stats(store: Described) -> Stats:
    """Counts, bytes on disk (every blob the index records), logical bytes (every head, stored apart)."""
    with store.reading("reading statistics") as conn:
        t = q.totals(conn)
    on_disk, logical = t.bytes_on_disk, t.logical_bytes
    return Stats(
        path=str(store.path),
        url=store.shown_url,
        format_version=FORMAT_VERSION,
        schema_revision=store.schema_revision,
        chunk_size=store.chunk_size,
        models=t.counts["models"],
        agents=t.counts["agents"],
        snapshots=t.counts["snapshots"],
        chunks=t.counts["chunks"],
        blobs=t.counts["blobs"],
        bytes_on_disk=on_disk,
        logical_bytes=logical,
        dedup_ratio=round(logical / on_disk, 4) if on_disk else 1.0,
    )


def head_chunk_bytes(store: Reading) -> int:
    """Bytes of the distinct chunks the agents' heads list: each shared chunk once (what the heads need on disk)."""
    with store.reading("reading statistics") as conn:
        return q.head_chunk_bytes(conn)


PARALLEL_AGENTS = 2000  # from this many agents on, the accounting runs as two halves on two connections


def _agent_half(store: Reading, k: int) -> list[q.HeadBytes]:
    with store.reading("accounting bytes") as conn:
        return q.head_bytes(conn, half=k)


def agent_bytes(store: Reading, name: str | None = None) -> dict[str, dict[str, int]]:
    """Per agent (or just `name`): {"unique_bytes", "shared_bytes", "total_bytes"} of its head snapshot."""
    if name is not None:
        validate_name(name)
    with store.reading("accounting bytes") as conn:
        names = q.agent_names(conn, name)
        if name is not None and not names:
            raise UnknownAgentError(f"no agent named {name!r} in this store")
        parallel = name is None and len(names) >= PARALLEL_AGENTS and store.io_threads > 1
        rows = [] if parallel else q.head_bytes(conn, name=name)
    if parallel:
        # The binary searches are independent per agent and the database drivers release the GIL while a
        # statement runs: two halves on two connections use two cores. (Like any report, each half is
        # one consistent read; a save committing in between can show in one half only.)
        with ThreadPoolExecutor(max_workers=2) as pool:
            rows = [r for part in pool.map(lambda k: _agent_half(store, k), (0, 1)) for r in part]
    out = {n: {"unique_bytes": 0, "shared_bytes": 0, "total_bytes": 0} for n in names}
    for r in rows:
        out[r.name] = {"unique_bytes": r.total - r.shared, "shared_bytes": r.shared, "total_bytes": r.total}
    return out


def chunk_runs(store: Reading, name: str) -> list[dict]:
    """The chunk map of an agent's head: runs of consecutive chunks that the same other agents share.

    Each run: first and last chunk index, token range [start, end), chunk count, bytes, and the
    names of the other agents whose head lists every chunk of the run.
    """
    validate_name(name)
    with store.reading(f"mapping agent {name!r}") as conn:
        agent = q.agent_head(conn, name)
        if agent is None:
            raise UnknownAgentError(f"no agent named {name!r} in this store")
        if agent.head is None:
            return []
        chunks = q.head_chunks(conn, agent.head)
        sharers = q.sharers(conn, head=agent.head, agent_id=agent.id)
    runs: list[dict] = []
    for c in chunks:
        start = c.seq * store.chunk_size  # every chunk but the last is full
        who = sharers.get(c.seq, [])
        if runs and runs[-1]["shared_with"] == who and runs[-1]["last"] == c.seq - 1:
            run = runs[-1]
            run.update(last=c.seq, end=start + c.length, chunks=run["chunks"] + 1, bytes=run["bytes"] + c.nbytes)
        else:
            runs.append(
                {
                    "first": c.seq,
                    "last": c.seq,
                    "start": start,
                    "end": start + c.length,
                    "chunks": 1,
                    "bytes": c.nbytes,
                    "shared_with": who,
                }
            )
    return runs


def model_summary(store: Reading) -> list[dict]:
    """Every model the store knows: fingerprint, name hint, layer layout, and its agents, snapshots and chunks."""
    with store.reading("listing models") as conn:
        models = q.models(conn)
        per = q.per_model(conn)
    out = []
    for m in models:
        slots = parse_json(m.layout, f"model {m.fingerprint}'s cache layout").get("slots", [])
        kinds: dict[str, int] = {}
        for cls, _kind, _params in slots:
            kinds[cls] = kinds.get(cls, 0) + 1
        out.append(
            {
                "fingerprint": m.fingerprint,
                "name": m.name,
                "created": m.created,
                "layers": len(slots),
                "cache_classes": kinds,
                "agents": per["agents"].get(m.id, 0),
                "snapshots": per["snapshots"].get(m.id, 0),
                "chunks": per["chunks"].get(m.id, 0),
            }
        )
    return out


def model_names(store: Reading) -> dict[str, str | None]:
    """fingerprint -> the model's name hint (None when the store was never told one): one small query."""
    with store.reading("listing models") as conn:
        return q.model_names(conn)
