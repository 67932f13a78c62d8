"""The byte-accounting oracle: each agent's unique, shared and total bytes recounted from plain rows by definition.

A chunk's bytes are its distinct blobs' bytes; a chunk is shared when another agent's head snapshot lists it.
The engine keeps these figures in the index (kvstore.index.sizes) and reads them in kvstore.ops.accounting;
the CLI and accounting tests compare what it reports with this slow recount.
"""

from __future__ import annotations

from sqlalchemy import text


def recount_bytes(store, from_files: bool = False) -> tuple[dict[str, dict[str, int]], int]:
    """({agent: {unique_bytes, shared_bytes, total_bytes}}, logical bytes of all heads).

    Blob bytes come from the blobs table, or with from_files=True from the blob files' sizes on disk.
    """
    with store.engine.connect() as conn:
        heads: dict[str, list[bytes]] = {n: [] for (n,) in conn.execute(text("SELECT name FROM agents"))}
        for name, key in conn.execute(
            text(
                "SELECT a.name, sc.chunk_key FROM agents a JOIN snapshot_chunks sc ON sc.snapshot_id = a.head "
                "ORDER BY a.name, sc.seq"
            )
        ):
            heads[name].append(bytes(key))
        blob_rows = dict(conn.execute(text("SELECT id, nbytes FROM blobs")).all())
        blobs: dict[bytes, set] = {}
        for key, blob in conn.execute(text("SELECT chunk_key, blob_id FROM chunk_layers")):
            blobs.setdefault(bytes(key), set()).add(blob)
    blob_bytes = (lambda b: store.blobs.path(b).stat().st_size) if from_files else (lambda b: blob_rows.get(b, 0))
    out = {}
    for name, keys in heads.items():
        others = {k for other, ks in heads.items() if other != name for k in ks}
        sizes = [(k in others, sum(blob_bytes(b) for b in blobs.get(k, ()))) for k in keys]
        out[name] = {
            "unique_bytes": sum(n for shared, n in sizes if not shared),
            "shared_bytes": sum(n for shared, n in sizes if shared),
            "total_bytes": sum(n for _, n in sizes),
        }
    return out, sum(v["total_bytes"] for v in out.values())
