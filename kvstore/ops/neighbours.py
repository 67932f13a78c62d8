"""Stored token sequences near a prompt: what the miss explainer compares a prompt with.

The restore planner finds the longest restorable prefix by chunk keys; a miss explanation wants the
token where a prompt first differs from anything stored, which can lie inside the next chunk. The
snapshots that list the last matched chunk hold the same prefix up to it: their tokens show where
the prompt goes its own way. With no chunk matched, the model's most recently saved heads stand in.
Its SQL is kvstore.index.reads_neighbours, run through `store.reading()`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from kvstore.cache.keys import tokens_from_bytes, tokens_to_array
from kvstore.index import reads_neighbours as reads

if TYPE_CHECKING:
    from kvstore.ops.parts import Reading
    from kvstore.records import Match

__all__ = ["Neighbour", "nearest_stored", "other_models"]

CANDIDATES = 16  # snapshots compared token by token per prompt


class Neighbour(NamedTuple):
    """A stored snapshot near a prompt."""

    common: int  # tokens in common with the prompt (from the start)
    agent: str  # the snapshot's agent
    tokens: list[int]  # the snapshot's token ids


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


def nearest_stored(store: Reading, tokens, fingerprint: str, match: Match) -> Neighbour | None:
    """The stored snapshot of model `fingerprint` that shares the longest token prefix with `tokens`."""
    toks = tokens_to_array(tokens)
    with store.reading("finding where a prompt leaves the store") as conn:
        if match.n_chunks:
            rows = reads.listing_chunk(conn, match.keys[-1], match.n_chunks - 1, CANDIDATES)
        else:
            rows = reads.recent_heads(conn, fingerprint, CANDIDATES)
    best: Neighbour | None = None
    for name, blob in rows:
        theirs = np.frombuffer(blob, dtype="<u4")
        n = _common(toks, theirs)
        if best is None or n > best.common:
            best = Neighbour(n, name, tokens_from_bytes(blob))
    return best


def other_models(store: Reading, own: Collection[str]) -> list[tuple[str, str | None]]:
    """(fingerprint, name hint) of every model in the store but those in `own`."""
    with store.reading("listing models") as conn:
        return [(fp, name) for fp, name in reads.models(conn) if fp not in own]
