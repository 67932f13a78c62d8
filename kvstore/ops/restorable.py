"""How many of a snapshot's tokens the store can rebuild from its layer rows: what dropping a blob costs.

A snapshot keeps its token ids whatever happens to its KV (they are primary data). When fsck --repair
drops a damaged blob, every snapshot listing a chunk that used it can rebuild only a shorter prefix:
`restore` and `match` stop there, `load` says so, and the agent manager recomputes the rest. fsck
measures each such snapshot before and after the repair so its report can say what was lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kvstore.cache import codec
from kvstore.cache.keys import chunk_spans
from kvstore.errors import StoreError
from kvstore.index import reads_restore as reads
from kvstore.ops.plan import longest

__all__ = ["Restorable", "restorable"]


@dataclass(frozen=True)
class Restorable:
    """A snapshot's agent, whether it is that agent's head, its token count, and the prefix its KV rebuilds."""

    agent: str
    head: bool
    n_tokens: int
    tokens: int


def restorable(conn, snapshot_ids, chunk_size: int) -> dict[int, Restorable]:
    """{snapshot id: Restorable} for these snapshots, from the layer rows as the transaction sees them.

    Snapshots whose rows a damaged page made unreadable (or whose model's layout is unreadable) are
    left out: fsck reports those as damage of their own.
    """
    ids = sorted(set(snapshot_ids))
    rows = reads.snapshot_owners(conn, ids)
    chunk_lists = reads.chunk_lists(conn, ids)
    layers = reads.checked_layers(
        conn, {bytes(k) for keys in chunk_lists.values() for k in keys if isinstance(k, bytes)}
    )
    layouts: dict[str, list | None] = {}
    out = {}
    for sid, row in rows.items():
        keys, n_tokens = chunk_lists.get(sid, []), row.n_tokens
        # Counted before any list is built: a damaged page can hold a token count of any size.
        if not isinstance(n_tokens, int) or n_tokens < 0 or -(-n_tokens // chunk_size) != len(keys):
            continue
        if not all(isinstance(k, bytes) for k in keys):
            continue
        spans = chunk_spans(n_tokens, chunk_size)
        if row.layout not in layouts:
            layouts[row.layout] = _slots(row.layout)
        slots = layouts[row.layout]
        if slots is None:
            continue
        try:
            n = longest(slots, [bytes(k) for k in keys], spans, layers) if keys else 0
        except (KeyError, TypeError, ValueError, IndexError):  # a layout that parses but does not plan
            continue
        out[sid] = Restorable(row.agent, row.head == sid, n_tokens, n)
    return out


def _slots(layout) -> list | None:
    try:
        return codec.layout_from_json(json.loads(layout))[1]
    except (KeyError, TypeError, ValueError, StoreError):
        return None
