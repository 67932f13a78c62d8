"""Typed rows the index hands to the engine's pure parts (the restore planner): no SQL, no driver.

kvstore.index.reads_restore fills them; kvstore.ops.plan takes them. Keys are bytes whatever the
driver handed back (psycopg gives memoryview for bytea).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Piece", "Layers", "TailRow", "SnapshotRow", "SnapshotOwner"]


class Piece(NamedTuple):
    """One stored (chunk, layer): the blob that holds it, and the leading tokens of the chunk it lacks."""

    blob_id: str
    first: int


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
