"""Typed rows the index hands to the engine's pure parts (the restore planner): no SQL, no driver.

kvstore.index.reads_restore fills them; kvstore.ops.plan takes them. Keys are bytes whatever the
driver handed back (psycopg gives memoryview for bytea).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Piece", "Layers", "TailRow", "SnapshotRow", "SnapshotOwner"]


# One stored (chunk, layer): (the blob that holds it, the leading tokens of the chunk it lacks). A plain
# tuple, not a NamedTuple: a restore builds one per chunk and layer (384 for 4,096 tokens of a 24-layer
# model), and a NamedTuple costs ~1 us each against ~0.15 us, a tenth of a millisecond per restore.
Piece = tuple[str, int]

Layers = dict[tuple[bytes, int], Piece]  # (chunk key, slot) -> the piece stored for it


class TailRow(NamedTuple):
    """A stored partial chunk (shorter than the chunk size), as the index lists it under its parent."""

    key: bytes
    length: int
    parent: bytes
    seq: int


class SnapshotRow(NamedTuple):
    """A snapshot with its agent and model: what a load, a fork or a token read starts from."""

    id: int
    n_tokens: int
    tokens: bytes  # the exact token ids, little-endian uint32
    fingerprint: str  # the model's fingerprint as stored (an unverified import's namespace)
    layout: str  # the model's cache layout, JSON text
    name: str  # the agent's name
    meta: str  # the agent's metadata, JSON text


class SnapshotOwner(NamedTuple):
    """A snapshot's token count, its agent and that agent's head, and its model's layout, as the rows hold them."""

    id: int
    n_tokens: int
    agent: str
    head: int | None
    layout: str
