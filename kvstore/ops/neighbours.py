"""Stored token sequences near a prompt: what the miss explainer compares a prompt with.

The restore planner finds the longest restorable prefix by chunk keys; a miss explanation wants the
token where a prompt first differs from anything stored, which can lie inside the next chunk. The
snapshots that list the last matched chunk hold the same prefix up to it: their tokens show where
the prompt goes its own way. With no chunk matched, the model's most recently saved heads stand in.
Plain SQL through `store.reading()`, like kvstore.ops.accounting.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

from kvstore.cache.keys import tokens_from_bytes, tokens_to_array

if TYPE_CHECKING:
    from kvstore.records import Match
    from kvstore.store_reads import StoreReads as Store

__all__ = ["Neighbour", "nearest_stored", "other_models"]

CANDIDATES = 16  # snapshots compared token by token per prompt

_BY_CHUNK = f"""
    SELECT a.name, s.tokens FROM snapshot_chunks sc JOIN snapshots s ON s.id = sc.snapshot_id
    JOIN agents a ON a.id = s.agent_id
    WHERE sc.chunk_key = :key AND sc.seq = :seq ORDER BY s.id DESC LIMIT {CANDIDATES}"""

_RECENT_HEADS = f"""
    SELECT a.name, s.tokens FROM agents a JOIN snapshots s ON s.id = a.head JOIN models m ON m.id = a.model_id
    WHERE m.fingerprint = :fp ORDER BY a.updated DESC LIMIT {CANDIDATES}"""


Neighbour = tuple[int, str, list[int]]  # (tokens in common with the prompt, agent name, its tokens)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


def nearest_stored(store: Store, tokens, fingerprint: str, match: Match) -> Neighbour | None:
    """The stored snapshot of model `fingerprint` that shares the longest token prefix with `tokens`."""
    toks = tokens_to_array(tokens)
    with store.reading("finding where a prompt leaves the store") as conn:
        if match.n_chunks:
            rows = conn.rows(_BY_CHUNK, {"key": match.keys[-1], "seq": match.n_chunks - 1})
        else:
            rows = conn.rows(_RECENT_HEADS, {"fp": fingerprint})
    best: Neighbour | None = None
    for name, blob in rows:
        theirs = np.frombuffer(blob, dtype="<u4")
        n = _common(toks, theirs)
        if best is None or n > best[0]:
            best = (n, name, tokens_from_bytes(blob))
    return best


def other_models(store: Store, own: Collection[str]) -> list[tuple[str, str | None]]:
    """(fingerprint, name hint) of every model in the store but those in `own`."""
    with store.reading("listing models") as conn:
        return [(fp, name) for fp, name in conn.rows("SELECT fingerprint, name FROM models") if fp not in own]
