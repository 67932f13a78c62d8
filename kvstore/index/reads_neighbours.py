"""The miss explainer's reads: stored token sequences that share a chunk with a prompt, and the models stored.

Plain SQL on a `reads.Reads`, so that it runs on a SQLAlchemy or a sqlite3 connection alike.
"""

from __future__ import annotations

from kvstore.index.reads import Reads

__all__ = ["listing_chunk", "recent_heads", "models"]

_BY_CHUNK = """
    SELECT a.name, s.tokens FROM agent_chunks ac JOIN agents a ON a.id = ac.agent_id
    JOIN snapshots s ON s.agent_id = a.id
    JOIN snapshot_chunks sc ON sc.snapshot_id = s.id AND sc.seq = :seq AND sc.chunk_key = ac.chunk_key
    WHERE ac.chunk_key = :key ORDER BY s.id DESC LIMIT {limit}"""

_RECENT_HEADS = """
    SELECT a.name, s.tokens FROM agents a JOIN snapshots s ON s.id = a.head JOIN models m ON m.id = a.model_id
    WHERE m.fingerprint = :fp ORDER BY a.updated DESC LIMIT {limit}"""


def listing_chunk(conn: Reads, key: bytes, seq: int, limit: int) -> list[tuple[str, bytes]]:
    """(agent name, token ids) of the newest `limit` snapshots that list chunk `key` at position `seq`."""
    return conn.rows(_BY_CHUNK.format(limit=int(limit)), {"key": key, "seq": seq})


def recent_heads(conn: Reads, fingerprint: str, limit: int) -> list[tuple[str, bytes]]:
    """(agent name, token ids) of the head snapshots of model `fingerprint`'s `limit` most recently saved agents."""
    return conn.rows(_RECENT_HEADS.format(limit=int(limit)), {"fp": fingerprint})


def models(conn: Reads) -> list[tuple[str, str | None]]:
    """(fingerprint, name) of every model in the store."""
    return conn.rows("SELECT fingerprint, name FROM models")
